"""DeepSeek Sparse Attention through the paged engine: the latent and the indexer keys in their own page
groups on one page table (so the radix cache covers both), decode scoring every cached indexer key and
attending only to the selected latent rows; IndexShare layers reuse the step's selection. Greedy tokens
equal transformers' greedy generate, with prefix caching on and off and with chunked prefill."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.layers import IndexerKeys, LatentKV  # noqa: E402

from tests.hf_oracle import hf_greedy, random_prompts  # noqa: E402
from tests.models.test_dsa_models import VOCAB, load  # noqa: E402

NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["deepseek_v32", "glm_moe_dsa-FSFS"])
def case(request, tmp_path_factory):
    hf, ours = load(request.param, tmp_path_factory.mktemp(request.param))
    prompts = random_prompts(VOCAB, (5, 30, 13, 40))
    return ours, prompts, hf_greedy(hf, prompts, NEW)


@pytest.mark.parametrize("prefix_caching, chunk", [(True, 2048), (False, 2048), (True, 8)])
def test_engine_matches_transformers(case, prefix_caching, chunk) -> None:
    ours, prompts, refs = case
    llm = LLM(ours, kv_cache_memory=4 << 20, page_size=4, enable_prefix_caching=prefix_caching,
              max_num_batched_tokens=chunk)
    assert {type(g.spec) for g in llm.kv.groups} == {LatentKV, IndexerKeys}
    assert len(llm.kv.tables) == 1          # one page table for both: a radix hit restores both
    assert (llm.kv.radix is not None) == prefix_caching
    outs = llm.generate(prompts + prompts[1:2], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs + refs[1:2]
    if prefix_caching:
        assert outs[-1].cached_tokens > 0   # the repeated prompt hit the cache, indexer keys included
    llm.check_integrity()
    llm.clear_prefix_cache()
    assert llm.kv.tables[0].pool.num_free == llm.kv.num_pages
