"""SWA/global hybrids through the paged engine: one page table for the global layers and one per sliding
window, sized to what the window can use; sliding pages released as decoding proceeds; greedy tokens equal
transformers' greedy generate with several requests at once."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("transformers")

from attnzoo.engine import LLM, SamplingParams  # noqa: E402

from tests.hf_oracle import hf_greedy, random_prompts  # noqa: E402
from tests.models.test_swa_hybrids import VOCAB, load  # noqa: E402

NEW = 32
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["cohere2", "mimo_v2_flash"])
def case(request, tmp_path_factory):
    hf, ours = load(request.param, tmp_path_factory.mktemp(request.param))
    prompts = random_prompts(VOCAB, (5, 30, 13, 40))
    return ours, prompts, hf_greedy(hf, prompts, NEW)


@pytest.mark.parametrize("prefix_caching, chunk", [(True, 2048), (False, 8)])
def test_engine_matches_transformers(case, prefix_caching, chunk, caplog) -> None:
    ours, prompts, refs = case
    with caplog.at_level(logging.INFO, logger="attnzoo.engine"):
        llm = LLM(ours, kv_cache_memory=4 << 20, page_size=4, enable_prefix_caching=prefix_caching,
                  max_num_batched_tokens=chunk, max_num_seqs=8)
    full, sliding = llm.kv.tables
    assert full.window is None and sliding.window == 8
    # the sliding table holds only what 8 sequences' windows (and one step's chunk) can use
    assert sliding.pool.capacity == min(8 * (-(-8 // 4) + 2) + -(-chunk // 4), 8 * (256 // 4) + 1)
    assert "sliding window 8" in caplog.text and "concurrent sequences" in caplog.text
    assert (llm.kv.radix is not None) == prefix_caching  # keeps window pages beside the full-context ones
    seen = []
    outs = []
    for p in prompts:
        llm.add_request(p, GREEDY)
    while llm.has_unfinished():
        outs += [o for o in llm.step() if o.finished]
        seen.append(max((len([q for q in r.page_tables[1] if q >= 0]) for r in llm.scheduler.running), default=0))
    # live sliding pages per sequence stay bounded (with a prefix cache: from the window's last page boundary)
    assert max(seen) <= -(-(8 - 1 + chunk + 3 * prefix_caching) // 4) + 1
    assert [o.token_ids for o in sorted(outs, key=lambda o: int(o.request_id))] == refs
    llm.check_integrity()
    llm.clear_prefix_cache()
    assert all(t.pool.num_free == t.pool.capacity for t in llm.kv.tables)


def test_capacity_report(case) -> None:
    """The saving is visible: more sequences of 256 tokens fit than an all-global cache of the same bytes holds."""
    ours, _, _ = case
    memory = 8 << 20
    llm = LLM(ours, kv_cache_memory=memory, page_size=16, max_num_seqs=64)
    n = llm.max_concurrent_sequences(256)
    assert n == min(llm.kv.max_concurrency(256), 64)
    all_global = sum(layer.attn.cache_spec().bytes_per_token(4) for layer in ours.layers) * 256
    assert n > memory // all_global
