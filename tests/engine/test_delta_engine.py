"""Delta-rule hybrids through the paged engine: a state pool with one slot per running sequence next to
the paged KV of the attention layers; chunked prefill passes the state along, decode updates it, preemption
and abort give the slot back. Greedy tokens equal transformers' greedy generate."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("transformers")

from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.engine.cache_plan import page_bytes, state_bytes  # noqa: E402
from attnzoo.layers.cache_spec import FullKV, LatentKV  # noqa: E402

from tests.hf_oracle import hf_greedy, random_prompts  # noqa: E402
from tests.models.test_delta_models import VOCAB, load  # noqa: E402

NEW = 32
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen3_next", "kimi_linear"])
def case(request, tmp_path_factory):
    hf, ours = load(request.param, tmp_path_factory.mktemp(request.param))
    prompts = random_prompts(VOCAB, (5, 70, 21, 1, 40))
    return request.param, ours, prompts, hf_greedy(hf, prompts, NEW)


@pytest.mark.parametrize("prefix_caching, chunk", [(True, 2048), (False, 16)])
def test_engine_matches_transformers(case, prefix_caching, chunk, caplog) -> None:
    name, ours, prompts, refs = case
    with caplog.at_level(logging.INFO, logger="attnzoo.engine"):
        llm = LLM(ours, kv_cache_memory=8 << 20, page_size=4, enable_prefix_caching=prefix_caching,
                  max_num_batched_tokens=chunk, max_num_seqs=8)
    want_group = LatentKV(16 + 8) if name == "kimi_linear" else FullKV(2, 16)
    assert [g.spec for g in llm.kv.groups] == [want_group]  # the delta-rule layers hold no pages
    assert llm.kv.states is not None and llm.kv.states.num_slots == 8
    # prefix caching keeps state snapshots at cached prefixes; outputs are the same either way
    assert (llm.kv.radix is not None) == prefix_caching
    outs = llm.generate(prompts + prompts[1:2], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs + refs[1:2]
    llm.check_integrity()
    assert len(llm.kv.states.free_slots) == 8
    llm.clear_prefix_cache()
    llm.check_integrity()
    assert all(g.pool.num_free == llm.kv.num_pages for g in llm.kv.groups)
    assert llm.kv.snapshots is None or len(llm.kv.snapshots.free_slots) == 8


def test_chunked_prefill_equals_one_pass(case) -> None:
    """A long prompt fed in 7-token chunks (state handed between chunks) gives the logits of one pass."""
    _, ours, prompts, _ = case
    outs = []
    for chunk in (2048, 7):
        llm = LLM(ours, kv_cache_memory=8 << 20, page_size=4, max_num_batched_tokens=chunk, max_num_seqs=4)
        outs.append(llm.generate([prompts[1]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                              logprobs=5), use_tqdm=False)[0])
    assert outs[0].token_ids == outs[1].token_ids
    for a, b in zip(outs[0].outputs[0].logprobs, outs[1].outputs[0].logprobs):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t] == pytest.approx(b[t], abs=1e-4)


def test_preemption_and_abort_release_slots(case) -> None:
    """A pool too small for every request at once forces preemption (recompute from a fresh slot); an
    aborted request gives its slot back; the survivors still match transformers."""
    _, ours, prompts, refs = case
    specs, dtype = ours.cache_specs(), ours.embed_tokens.weight.dtype
    # room for 3 sequences' states (and 3 prefix-cache snapshots) and 30 pages of 4 tokens: the running
    # requests outgrow the pages
    memory = 6 * state_bytes(specs, dtype) + 30 * page_bytes(specs, 4, dtype)
    llm = LLM(ours, kv_cache_memory=memory, page_size=4, max_num_seqs=3, max_num_batched_tokens=2048)
    assert llm.kv.num_pages == 30
    for p in prompts:
        llm.add_request(p, GREEDY)
    victim = llm.add_request(prompts[0], GREEDY)
    done = {}
    steps = 0
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        if steps == 3:
            llm.abort(victim)
            llm.check_integrity()
    assert llm.scheduler.num_preemptions > 0
    got = [done[k].token_ids for k in sorted(done) if k != victim]
    assert sorted(map(tuple, got)) == sorted(map(tuple, refs))
    llm.check_integrity()
    assert len(llm.kv.states.free_slots) == 3
