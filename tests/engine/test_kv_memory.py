"""KV cache memory: the default budget is the documented rule, chat-style sizing holds exactly one
full-context sequence, pages are allocated untouched, and memory the engine never wrote (here: NaN in
every slot) never reaches an output."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch

from attnzoo.arena import mechanisms
from attnzoo.engine import LLM, SamplingParams
from attnzoo.engine import llm as llm_module
from attnzoo.engine.cache_plan import page_bytes, plan_cache, sequence_bytes
from attnzoo.engine.memory import DEFAULT_KV_CACHE_FRACTION
from attnzoo.engine.request import Request
from attnzoo.models import DecoderLM

SHAPE = mechanisms.Shape(vocab_size=101, hidden=32, layers=4, heads=4, head_dim=8, intermediate=64, seq_len=32,
                         max_positions=128)
# one of each cache layout: K/V, sliding + full tables, latent rows, recurrent states + K/V, states only
KINDS = {"gqa": mechanisms.gqa, "swa_hybrid": mechanisms.swa_hybrid_3_1, "mla": mechanisms.mla,
         "gdn_hybrid": mechanisms.gdn_hybrid_3_1, "gdn": mechanisms.gdn}


def tiny(kind: str = "gqa") -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(KINDS[kind](SHAPE)).eval()
    for n, p in model.named_parameters():  # large weights: peaked logits, so greedy tokens are not ties
        p.data.uniform_(0.5, 1.5) if "norm" in n else p.data.normal_(0, 0.3)
    return model


def fake_available(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    monkeypatch.setattr(llm_module, "available_memory", lambda device: nbytes)


def per_sequence(model: DecoderLM, max_num_seqs: int, max_model_len: int | None = None) -> tuple[int, int]:
    return sequence_bytes(model.cache_specs(), 16, torch.float32, max_num_seqs, 2048,
                          max_model_len or model.config.max_position_embeddings)


@pytest.mark.parametrize("kind", ["gqa", "swa_hybrid", "mla", "gdn_hybrid"])
def test_sequence_bytes_is_what_plan_cache_needs(kind):
    model, L = tiny(kind), SHAPE.max_positions
    fixed, per = per_sequence(model, 8)
    for n in (1, 3, 8):
        plan = plan_cache(model.cache_specs(), 16, torch.float32, fixed + n * per, 8, 2048, L)
        # at least n (a sliding table capped at what max_num_seqs can use leaves the full table the rest)
        assert plan.max_concurrency(L) == n if kind in ("gqa", "mla") else plan.max_concurrency(L) >= n
        assert plan.total_bytes <= fixed + n * per


def test_default_budget_is_max_num_seqs_sequences_when_memory_allows(monkeypatch):
    model = tiny()
    fixed, per = per_sequence(model, 64)
    fake_available(monkeypatch, 100 * (fixed + 64 * per))  # 10 % of it holds all 64 ten times over
    llm = LLM(model, max_num_seqs=64)
    L = model.config.max_position_embeddings
    assert llm.max_concurrent_sequences(L) == 64
    assert llm.kv.num_pages == 64 * L // 16 + 1  # never more than max_num_seqs full sequences can use


def test_default_budget_is_capped_at_a_tenth_of_available_memory(monkeypatch):
    model = tiny()
    fixed, per = per_sequence(model, 64)
    fake_available(monkeypatch, 10 * (fixed + 5 * per) + 9)  # a tenth holds 5 full-context sequences, not 6
    llm = LLM(model, max_num_seqs=64)
    L = model.config.max_position_embeddings
    assert DEFAULT_KV_CACHE_FRACTION == 0.1
    assert llm.max_concurrent_sequences(L) == 5
    assert llm.kv.num_pages == 5 * L // 16 + 1


def test_default_budget_is_never_less_than_one_sequence(monkeypatch, caplog):
    model = tiny()
    fake_available(monkeypatch, 1000)  # far less than one sequence
    with caplog.at_level(logging.INFO, logger="attnzoo.engine"):
        llm = LLM(model, max_num_seqs=64)
    L = model.config.max_position_embeddings
    assert llm.max_concurrent_sequences(L) == 1
    assert "one sequence is the least" in caplog.text
    assert any(r.levelno == logging.WARNING and "available" in r.getMessage() for r in caplog.records)


def test_explicit_budgets(monkeypatch):
    model = tiny()
    fixed, per = per_sequence(model, 64)
    fake_available(monkeypatch, 1 << 40)
    assert LLM(model, kv_cache_memory=fixed + 2 * per).max_concurrent_sequences(128) == 2
    fake_available(monkeypatch, 4 * (fixed + 3 * per))
    assert LLM(model, kv_cache_fraction=0.25).max_concurrent_sequences(128) == 3


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("max_model_len", [None, 50])
def test_chat_sizing_holds_exactly_one_max_length_sequence(kind, max_model_len):
    """`attnzoo chat` / `generate`: max_num_seqs=1 and the default budget, whatever memory is free."""
    llm = LLM(tiny(kind), max_num_seqs=1, max_model_len=max_model_len)
    L = max_model_len or SHAPE.max_positions
    assert llm.max_model_len == L
    assert llm.max_concurrent_sequences(L) == 1
    assert llm.kv.num_pages == -(-L // 16) + 1
    a, b = (Request(rid, [1] * (L - 1), SamplingParams(max_tokens=1)) for rid in "ab")
    assert llm.kv.allocate(a, L)      # one full-context sequence fits (pages and state slot)...
    assert not llm.kv.allocate(b, L)  # ...and a second does not
    llm.kv.free(a)
    llm.check_integrity()


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(max_model_len=129), r"max_model_len must be an integer in 1\.\.128 \(the model's context\), got 129"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(kv_cache_memory=0), "kv_cache_memory"),
    (dict(kv_cache_memory=1.5e9), "kv_cache_memory"),
    (dict(kv_cache_fraction=0), r"kv_cache_fraction must be a number in \(0, 1\]"),
    (dict(kv_cache_fraction=1.01), "kv_cache_fraction"),
    (dict(kv_cache_memory=1 << 20, kv_cache_fraction=0.5), "not both"),
    (dict(max_num_seqs=0), "max_num_seqs"),
])
def test_bad_engine_options_are_rejected(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LLM(tiny(), **kwargs)


def test_a_prompt_longer_than_max_model_len_is_rejected():
    llm = LLM(tiny(), max_model_len=32)
    with pytest.raises(ValueError, match="context"):
        llm.add_request(list(range(1, 33)))
    with pytest.raises(ValueError, match="context"):
        llm.add_request([1, 2], SamplingParams(max_tokens=31))
    llm.check_integrity()


def run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    params = [SamplingParams(max_tokens=8 + i % 5, temperature=0, ignore_eos=True, logprobs=1)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.check_integrity()
    return [(o.token_ids, [lp[t] for t, lp in zip(o.token_ids, o.outputs[0].logprobs)]) for o in outs]


def poison(llm: LLM) -> None:
    cache = llm.runner.cache
    for g in cache.groups:
        for t in g.tensors.values():
            t.fill_(float("nan"))
    if cache.states is not None:
        for t in (*cache.states.conv.values(), *cache.states.state.values()):
            t.fill_(float("nan"))


@pytest.mark.parametrize("kind, pages", [(k, None) for k in KINDS] + [("gqa", 24), ("mla", 24)])
def test_nan_poisoned_pool_gives_identical_outputs(kind, pages):
    """Every slot of every page (and state slot) holds NaN before the first request: decode gathers whole
    pages, pads short page lists with page 0 and masks the rest, so an unzeroed slot would turn outputs NaN.
    With `pages`, the pool is that small: requests are preempted and pages reused."""
    model = tiny(kind)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 101, (37,), generator=g).tolist()  # prefix-cache hits across requests
    prompts = [(shared if i % 2 else []) + torch.randint(0, 101, (n,), generator=g).tolist()
               for i, n in enumerate((3, 17, 40, 9, 1, 25, 5, 33))]
    kw = dict(page_size=4, max_num_batched_tokens=24, max_num_seqs=4)
    memory = 4 << 20 if pages is None else pages * page_bytes(model.cache_specs(), 4, torch.float32)
    clean, dirty = LLM(model, kv_cache_memory=memory, **kw), LLM(model, kv_cache_memory=memory, **kw)
    poison(dirty)
    want = run(clean, prompts)
    assert run(dirty, prompts) == want
    assert all(math.isfinite(x) for _, lps in want for x in lps)
    assert run(dirty, prompts[::-1]) == run(clean, prompts[::-1])  # pages reused, prefixes cached
    if pages is not None:
        assert dirty.scheduler.num_preemptions > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_pages_are_allocated_untouched():
    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))

    torch.manual_seed(0)
    model = DecoderLM(mechanisms.gqa(mechanisms.Shape(vocab_size=101, hidden=32, layers=4, heads=4, head_dim=8,
                                                      intermediate=64, max_positions=8192))).eval()
    before = rss()
    llm = LLM(model, kv_cache_memory=256 << 20)
    assert llm.kv.num_pages * page_bytes(model.cache_specs(), 16, torch.float32) > 250 << 20
    assert rss() - before < 32 << 20  # torch.zeros would have touched all 256 MiB
    run(llm, [[1, 2, 3], list(range(1, 60))])
    assert rss() - before < 48 << 20  # two short requests touch a few pages


def test_a_mechanism_without_a_decode_cache_is_refused_at_construction(monkeypatch):
    """A layer that declares no cache can hold it (CacheKind.UNSERVED), instead of a spec the layer would
    then refuse mid-step: the engine says so before planning any memory, naming the mechanism."""
    from attnzoo.layers.cache_spec import Unserved
    model = DecoderLM(mechanisms.gqa(mechanisms.Shape(vocab_size=101, hidden=32, layers=2, heads=4, head_dim=8,
                                                      intermediate=64, max_positions=256))).eval()
    monkeypatch.setattr(type(model.layers[0].attn), "cache_spec",
                        lambda self: Unserved("XSA", "decode is not implemented", 16))
    with pytest.raises(NotImplementedError, match=r"layer 0 cannot be served: XSA decode is not implemented"):
        LLM(model, kv_cache_memory=1 << 20)
