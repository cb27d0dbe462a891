"""MLA through the paged engine: a LatentKV cache group (one latent row per token), absorbed decode from
the pages, expanded prefill chunks; greedy tokens equal transformers' greedy generate."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.layers import LatentKV  # noqa: E402

from tests.hf_oracle import hf_greedy  # noqa: E402
from tests.models.test_deepseek_v3 import VOCAB, YARN, load  # noqa: E402

NEW = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # YaRN + MoE with group-limited routing: the hardest of the conformance configs
    return load({**YARN, "first_k_dense_replace": 1, "n_routed_experts": 8, "n_group": 2, "topk_group": 2},
                tmp_path_factory.mktemp("dsv3"))


@pytest.fixture(scope="module")
def references(models):
    hf, _ = models
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 21, 40, 7)]
    return prompts, hf_greedy(hf, prompts, NEW)


@pytest.mark.parametrize("prefix_caching, chunk", [(True, 2048), (False, 2048), (True, 8)])
def test_engine_matches_transformers(models, references, prefix_caching, chunk, monkeypatch):
    import attnzoo.ops.latent.paged as lp
    calls = []
    real = lp.mla_paged_decode_torch
    monkeypatch.setattr(lp, "mla_paged_decode_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, ours = models
    prompts, refs = references
    llm = LLM(ours, kv_cache_memory=4 << 20, page_size=4, enable_prefix_caching=prefix_caching,
              max_num_batched_tokens=chunk)
    assert [g.spec for g in llm.kv.groups] == [LatentKV(16 + 8)]  # one latent group, no K/V per head
    outs = llm.generate(prompts + prompts[:1], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    assert [o.token_ids for o in outs] == refs + refs[:1]
    assert len(calls) >= NEW - 1  # decode steps ran the absorbed form straight from the pages
    if prefix_caching:
        assert outs[-1].cached_tokens > 0  # the repeated prompt hit the radix cache
    llm.check_integrity()
    llm.clear_prefix_cache()
    assert llm.kv.groups[0].pool.num_free == llm.kv.num_pages
