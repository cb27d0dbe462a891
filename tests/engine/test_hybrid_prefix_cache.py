"""Prefix caching for hybrids: sliding-window models (window pages kept beside the full-context pages, or a
bookkeeping table when every layer slides) and recurrent models (state snapshots at keep points). For each
family: greedy tokens with the cache on equal those with it off, with hits asserted, in 8-token chunks and
with a pool small enough to force preemption; afterwards the integrity check holds and everything is free
once the cache is cleared. (Cache-off outputs are themselves checked against transformers elsewhere.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import attnzoo  # noqa: E402
from attnzoo.arena import mechanisms  # noqa: E402
from attnzoo.engine import LLM, SamplingParams, paged_cache  # noqa: E402
from attnzoo.engine.cache_plan import sequence_bytes  # noqa: E402
from attnzoo.models import DecoderLM  # noqa: E402

from tests.hf_oracle import save_and_load  # noqa: E402

NEW = 10
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
PS = 4
MAX_LEN = 128


def _peaked(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights large enough that greedy continuations are not near-ties (our own configs start at
    zero-initialised norms and gates: randomise them)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("A_log", "dt_bias")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3)
    return model.eval()


def _arena(name: str) -> DecoderLM:
    shape = mechanisms.Shape(vocab_size=101, hidden=32, layers=4, heads=4, head_dim=8, intermediate=64, seq_len=64,
                             max_positions=256)  # window 16
    return _peaked(DecoderLM(mechanisms.config_for(name, shape)))


def _hf(name: str, path: Path) -> DecoderLM:
    if name in ("cohere2", "mimo_v2_flash"):
        from tests.models.test_swa_hybrids import load
        return load(name, path)[1]
    if name in ("qwen3_next", "qwen3_5", "kimi_linear"):
        from tests.models.test_delta_models import load
        return load(name, path)[1]
    if name == "glm5_next":
        from tests.models.test_glm5_next import make_hf
        hf = make_hf()
        hf.save_pretrained(path, safe_serialization=True)
        return attnzoo.load_model(path)
    if name in ("mistral", "qwen3-swa"):
        from tests.models.test_hf_conformance import CASES, make_hf
        family, overrides, _ = CASES["mistral-swa" if name == "mistral" else name]
        return save_and_load(make_hf(family, overrides), path)[1]
    raise KeyError(name)


FAMILIES = ["cohere2", "mimo_v2_flash", "mistral", "qwen3-swa", "arena:swa_hybrid_3_1", "arena:swa",
            "qwen3_next", "qwen3_5", "kimi_linear", "glm5_next", "arena:gdn", "arena:gdn_hybrid_3_1"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory) -> DecoderLM:
    name = request.param
    if name.startswith("arena:"):
        return _arena(name.removeprefix("arena:"))
    return _hf(name, tmp_path_factory.mktemp(name.replace(":", "_")))


def workload(vocab: int) -> list[list[int]]:
    """Prompts that share a 37-token prefix (four of them), part of it (one), and nothing (one)."""
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    base = rand(37)
    return [base + rand(k) for k in (5, 9, 3, 12)] + [base[:21] + rand(6), rand(19)]


def run(model: DecoderLM, **kw) -> tuple[list[list[int]], list[int], LLM]:
    """Two rounds: the workload at once, then two follow-ups that extend round-one conversations (prompt +
    answer + a new turn). Returns every output's tokens, its cached prompt tokens and the engine."""
    llm = LLM(model, page_size=PS, max_model_len=MAX_LEN, max_num_seqs=8, **kw)
    prompts = workload(model.config.vocab_size)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    g = torch.Generator().manual_seed(4)
    follow = [prompts[i] + first[i].token_ids + torch.randint(0, model.config.vocab_size, (7,), generator=g).tolist()
              for i in (0, 2)]
    second = llm.generate(follow, GREEDY, use_tqdm=False)
    outs = first + second
    llm.check_integrity()
    return [o.token_ids for o in outs], [o.cached_tokens for o in outs], llm


def assert_all_free(llm: LLM) -> None:
    llm.clear_prefix_cache()
    llm.check_integrity()
    kv = llm.kv
    assert all(t.pool.num_free == t.pool.capacity for t in kv.tables)
    if kv.states is not None:
        assert len(kv.states.free_slots) == kv.states.num_slots
    if kv.snapshots is not None:
        assert len(kv.snapshots.free_slots) == kv.snapshots.num_slots


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    tokens, cached, llm = run(model, enable_prefix_caching=False)
    assert llm.kv.radix is None and not any(cached)
    return tokens


@pytest.mark.parametrize("chunk", [2048, 8])
def test_cache_on_equals_off_with_hits(model, reference, chunk) -> None:
    tokens, cached, llm = run(model, max_num_batched_tokens=chunk, kv_cache_memory=16 << 20)
    assert llm.kv.radix is not None
    assert tokens == reference
    # round one: the shared prefix is hit once a branch point has been computed; round two: the whole
    # previous conversation up to its last page boundary (windows) or the previous prompt's (states)
    assert sum(cached[:6]) > 0 and all(c > 0 for c in cached[6:]), cached
    assert all(c % PS == 0 and c < 64 for c in cached[:6])
    assert_all_free(llm)


def test_cache_on_equals_off_under_preemption(model, reference) -> None:
    """The smallest pool (in steps of MAX_LEN/32 tokens of memory) that still holds the longest request
    alone: requests are preempted and recomputed, cached prefixes evicted, window pages tombstoned,
    snapshots dropped; the tokens stay. (A model without paged layers only runs out of state slots,
    which the scheduler never overcommits; a model whose every layer slides holds a window per sequence,
    and with prompts waiting for a shared prefill this workload does not outgrow it: no preemption is
    asserted for those two.)"""
    specs, dtype = model.cache_specs(), model.embed_tokens.weight.dtype
    fixed, per_seq = sequence_bytes(specs, PS, dtype, 8, 32, MAX_LEN, snapshots=8)
    longest = 59 + NEW + 7 + NEW   # a round-two prompt plus its answer
    for k in range(4, 128):
        memory = fixed + per_seq * k // 32
        try:
            probe = LLM(model, page_size=PS, max_model_len=MAX_LEN, max_num_seqs=8, max_num_batched_tokens=32,
                        kv_cache_memory=memory)
        except ValueError:  # does not even hold the fixed part
            continue
        if probe.kv.pages_short(longest, 32) is None:
            break
    tokens, _, llm = run(model, max_num_batched_tokens=32, kv_cache_memory=memory)
    assert tokens == reference
    if llm.kv.groups and not llm.kv.tables[0].keys_only:
        assert llm.scheduler.num_preemptions > 0
    assert_all_free(llm)


def test_first_request_leaves_usable_points(model, reference, monkeypatch) -> None:
    """With a keep point every 16 tokens, the first request of the shared 37-token prefix already leaves
    window pages and states at 16 and 32; the three prompts after it wait while it prefills (it computes
    their next page) and then hit 32 tokens without computing the prefix themselves."""
    monkeypatch.setattr(paged_cache, "KEEP_EVERY", 16)
    tokens, cached, llm = run(model, kv_cache_memory=16 << 20)
    assert tokens == reference
    assert cached[0] == 0 and all(c >= 32 for c in cached[1:4]), cached
    assert_all_free(llm)
