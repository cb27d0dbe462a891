"""MiniMax Sparse Attention through the paged engine: K/V and index keys in two groups on one page table
(the radix cache covers both); each query scores its sequence's cached index keys, picks blocks per GQA
group and attends block-sparsely over its pages. Greedy tokens equal transformers' greedy generate."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.layers import FullKV, IndexerKeys  # noqa: E402

from tests.hf_oracle import hf_greedy, random_prompts  # noqa: E402
from tests.models.test_minimax_m3 import VOCAB, load  # noqa: E402

NEW = 24


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    hf, ours = load(tmp_path_factory.mktemp("minimax"))
    prompts = random_prompts(VOCAB, (5, 30, 13, 40))
    return ours, prompts, hf_greedy(hf, prompts, NEW)


@pytest.mark.parametrize("prefix_caching, chunk", [(True, 2048), (False, 2048), (True, 8)])
def test_engine_matches_transformers(case, prefix_caching, chunk) -> None:
    ours, prompts, refs = case
    llm = LLM(ours, kv_cache_memory=4 << 20, page_size=4, enable_prefix_caching=prefix_caching,
              max_num_batched_tokens=chunk)
    assert {g.spec for g in llm.kv.groups} == {FullKV(2, 16), IndexerKeys(16)}
    assert len(llm.kv.tables) == 1 and (llm.kv.radix is not None) == prefix_caching
    outs = llm.generate(prompts + prompts[1:2], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    assert [o.token_ids for o in outs] == refs + refs[1:2]
    if prefix_caching:
        assert outs[-1].cached_tokens > 0
    llm.check_integrity()
    llm.clear_prefix_cache()
    assert llm.kv.tables[0].pool.num_free == llm.kv.num_pages
