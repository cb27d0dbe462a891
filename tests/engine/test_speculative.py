"""Speculative decoding for every family the engine serves: greedy tokens with drafting equal the tokens without it
(the engine's own, themselves checked against transformers elsewhere), batched, and in 8-token prefill chunks
with the prefix cache on in a pool small enough to force preemption; the integrity check holds after.

Random weights rarely repeat themselves, so n-gram drafts alone would seldom be kept on some families. The
family test therefore drafts from the known answer with one wrong token in every other proposal: every
request keeps drafts and has some rejected mid-chunk, so every cache kind is rolled back (pages, latents,
indexer keys, compressed rows, delta-rule states). The n-gram drafter itself runs end to end on a model whose
greedy output loops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import attnzoo  # noqa: E402
from attnzoo.arena import mechanisms  # noqa: E402
from attnzoo.engine import LLM, SamplingParams  # noqa: E402
from attnzoo.engine.cache_plan import sequence_bytes  # noqa: E402
from attnzoo.engine.speculative import AdaptiveK, Drafter, NgramIndex, SpeculativeConfig, Throttle  # noqa: E402
from attnzoo.models import DecoderLM  # noqa: E402

from tests.engine.test_hybrid_prefix_cache import _arena, _hf, _peaked  # noqa: E402
from tests.hf_oracle import save_and_load  # noqa: E402

NEW = 20
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
# min 1: drafts on every repeated token, so many are rejected as well as kept
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "adaptive": False}
PS, MAX_LEN = 4, 128


def _load(name: str, path: Path) -> DecoderLM:
    if name.startswith("arena:"):
        return _arena(name.removeprefix("arena:"))
    if name == "arena-nsa":
        shape = mechanisms.Shape(vocab_size=101, hidden=32, layers=2, heads=4, head_dim=8, intermediate=64,
                                 seq_len=64, max_positions=256)
        return _peaked(DecoderLM(mechanisms.nsa(shape)))
    if name in ("llama", "qwen3"):
        from tests.models.test_hf_conformance import CASES, make_hf
        family, overrides, _ = CASES["llama-gqa" if name == "llama" else name]
        return save_and_load(make_hf(family, overrides), path)[1]
    if name == "deepseek_v3":
        from tests.models.test_deepseek_v3 import YARN, load
        return load({**YARN, "first_k_dense_replace": 1, "n_routed_experts": 8, "n_group": 2, "topk_group": 2},
                    path)[1]
    if name in ("deepseek_v32", "glm_moe_dsa"):
        from tests.models.test_dsa_models import load
        return load("deepseek_v32" if name == "deepseek_v32" else "glm_moe_dsa-FSFS", path)[1]
    if name == "minimax_m3":
        from tests.models.test_minimax_m3 import load
        return load(path)[1]
    return _hf(name, path)


# CI runs one family per cache kind (full K/V, sliding window, MLA latent, delta-rule state beside attention,
# DSA indexer keys, MSA index keys, NSA compressed rows); --runslow adds the families that repeat those kinds
_SLOW = ["qwen3", "cohere2", "mimo_v2_flash", "qwen3_5", "kimi_linear", "glm_moe_dsa", "glm5_next",
         "arena:gdn_hybrid_3_1"]
FAMILIES = ["llama", "mistral", "deepseek_v3", "qwen3_next", "deepseek_v32", "minimax_m3", "arena-nsa"] + \
    [pytest.param(f, marks=pytest.mark.slow) for f in _SLOW]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory) -> DecoderLM:
    return _load(request.param, tmp_path_factory.mktemp(request.param.replace(":", "_")))


def prompts(vocab: int) -> list[list[int]]:
    """Prompts that repeat themselves (so n-gram drafts exist from the start), two of them sharing a prefix."""
    g = torch.Generator().manual_seed(7)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    a, b = rand(6), rand(5)
    return [a + rand(3) + a + rand(2) + a[:3], b + b + b[:2], a + rand(3) + a + rand(5), rand(9)]


class AnswerDrafter(Drafter):
    """Drafts the reference answer's next k tokens, the last of them wrong in every other proposal."""

    def __init__(self, llm: LLM, answers: dict[tuple[int, ...], list[int]]):
        super().__init__(llm.spec_config, llm.max_model_len)
        self.answers, self.vocab, self.calls = answers, llm.model.config.vocab_size, 0

    def propose(self, reqs: list) -> None:
        for r in reqs:
            k, m = self.budget(r), len(r.output_ids)
            draft = self.answers[tuple(r.prompt_ids)][m:m + k]
            self.calls += 1
            if draft and self.calls % 2:
                draft[-1] = (draft[-1] + 1) % self.vocab
            r.spec_ids = draft


def run(model: DecoderLM, spec: dict | None, answers: list[list[int]] | None = None, **kw
        ) -> tuple[list[list[int]], LLM]:
    llm = LLM(model, page_size=PS, max_model_len=MAX_LEN, max_num_seqs=8, speculative_config=spec, **kw)
    ps = prompts(model.config.vocab_size)
    if answers is not None:
        llm.drafter = AnswerDrafter(llm, {tuple(p): a for p, a in zip(ps, answers)})
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    llm.check_integrity()
    return [o.token_ids for o in outs], llm


def tight_memory(model: DecoderLM) -> int:
    """The smallest KV budget (in steps of MAX_LEN/32 tokens per sequence) that holds the longest request alone."""
    specs, dtype = model.cache_specs(), model.embed_tokens.weight.dtype
    fixed, per_seq = sequence_bytes(specs, PS, dtype, 8, 8, MAX_LEN, snapshots=8)
    for k in range(4, 128):
        memory = fixed + per_seq * k // 32
        try:
            probe = LLM(model, page_size=PS, max_model_len=MAX_LEN, max_num_seqs=8, max_num_batched_tokens=8,
                        kv_cache_memory=memory)
        except ValueError:
            continue
        if probe.kv.pages_short(25 + NEW, 8) is None:
            return memory
    raise AssertionError("no budget holds one request")


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    return run(model, None)[0]


@pytest.mark.parametrize("setting", ["batched", "chunked+prefix+preemption"])
def test_drafts_keep_greedy_tokens(model, reference, setting) -> None:
    kw = dict(enable_prefix_caching=False) if setting == "batched" else \
        dict(max_num_batched_tokens=8, kv_cache_memory=tight_memory(model))
    tokens, llm = run(model, NGRAM, answers=reference, **kw)
    assert tokens == reference
    s = llm.spec_stats
    assert 0 < s.accepted < s.drafted, (s.accepted, s.drafted)   # drafts kept and drafts rolled back
    if setting != "batched" and llm.kv.groups and not llm.kv.tables[0].keys_only:
        assert llm.scheduler.num_preemptions > 0
    llm.clear_prefix_cache()
    llm.check_integrity()
    assert all(t.pool.num_free == t.pool.capacity for t in llm.kv.tables)


# ---- the configuration and the n-gram drafter ---------------------------------------------------

@pytest.mark.parametrize("cfg, match", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be an integer in \[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": 1000}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tokens": 3}, r"unknown key\(s\) \['draft_tokens'\]"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model .* is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "applies to method 'draft_model'"),
    ('{"method": "ngram", "num_spec', "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_config_is_one_clear_error(cfg, match) -> None:
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(cfg)


def test_config_defaults_and_json() -> None:
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4}')
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (2, 4)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_max": 1}).prompt_lookup_min == 1


def test_ngram_index_finds_the_latest_earlier_occurrence() -> None:
    idx = NgramIndex(1, 3)
    toks = [5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6]
    assert idx.propose(toks, 3) == [9, 2, 5]             # "5 6" last seen before 9 2 5 (not the first 7 8 1)
    assert idx.propose(toks + [7], 2) == [8, 1]          # "5 6 7": the longest match wins
    assert idx.propose(toks + [7, 4], 2) == []           # 4 never occurred before
    assert NgramIndex(2, 3).propose([1, 2, 3, 1], 4) == []   # a 1-gram match is below prompt_lookup_min


def test_adaptive_k_backs_off_and_recovers() -> None:
    k = AdaptiveK(4)
    assert k.next_k() == 4
    for _ in range(6):
        k.update(k.next_k() or 1, 0)
    assert k.pause > 0 and k.next_k() == 0
    while k.pause:
        k.next_k()
    for _ in range(8):
        k.update(k.next_k(), 4)
    assert k.next_k() == 4


def test_throttle_pauses_drafting_that_loses_tokens_per_second() -> None:
    t = Throttle()
    for _ in range(3):
        t.observe(False, 1, 0.010)                  # plain decode: 100 tok/s
    for _ in range(4):
        assert not t.paused
        t.observe(True, 2, 0.025)                   # verifying: 80 tok/s
    assert t.paused and t.pause == 16
    for _ in range(16):
        t.tick()
    assert not t.paused and True not in t.rate      # tried again, measured afresh
    for _ in range(4):
        t.observe(True, 2, 0.025)
    assert t.pause == 32                            # still losing: a longer pause
    for _ in range(32):
        t.tick()
    for _ in range(4):
        t.observe(True, 4, 0.025)                   # 160 tok/s: drafting pays now
    assert not t.paused and t.backoff == 16
    probe = Throttle()
    for _ in range(Throttle.PROBE_EVERY + 1):
        probe.tick()                                # every step drafted: no plain step timed ...
    assert probe.paused                             # ... so two plain steps are taken to time one


def _peaked_llama(path: Path) -> DecoderLM:
    """A tiny llama with peaked logits: its greedy output repeats itself now and then, so some n-gram drafts are
    kept (most are rejected)."""
    from tests.models.test_hf_conformance import CASES, make_hf
    family, overrides, _ = CASES["llama-gqa"]
    return _peaked(save_and_load(make_hf(family, overrides), path)[1])


def test_ngram_end_to_end_with_n_logprobs_and_stops(tmp_path) -> None:
    """Real n-gram drafts: the same tokens, logprobs and stop as without drafting, for
    n = 2 completions and a stop token; each output reports its drafted and kept tokens."""
    model = _peaked_llama(tmp_path)
    ps = prompts(model.config.vocab_size)
    plain = LLM(model, page_size=PS, max_model_len=MAX_LEN)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2, n=2)
    want = plain.generate(ps, params, use_tqdm=False)
    stop = want[0].token_ids[25]
    params_stop = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    want_stop = plain.generate(ps[:1], params_stop, use_tqdm=False)[0]
    llm = LLM(model, page_size=PS, max_model_len=MAX_LEN, speculative_config=NGRAM)
    got = llm.generate(ps, params, use_tqdm=False)
    for w, g in zip(want, got):
        for a, b in zip(w.outputs, g.outputs):
            assert a.token_ids == b.token_ids
            assert [sorted(x) for x in a.logprobs] == [sorted(x) for x in b.logprobs]
            assert all(abs(x[t] - y[t]) < 1e-4 for x, y in zip(a.logprobs, b.logprobs) for t in x)
    assert sum(o.num_accepted_tokens for o in got) == llm.spec_stats.accepted > 0   # drafts kept ...
    assert sum(o.num_draft_tokens for o in got) == llm.spec_stats.drafted > llm.spec_stats.accepted  # ... and not
    got_stop = llm.generate(ps[:1], params_stop, use_tqdm=False)[0]
    assert got_stop.token_ids == want_stop.token_ids and got_stop.finish_reason == "stop"
    llm.check_integrity()


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_deterministic_mode_is_bit_exact_on_the_default_model(dtype) -> None:
    """Batch-invariant kernels give a token the same bits in a verify chunk as in a decode row: with n-gram drafts
    the default model's greedy tokens and their logprobs are bit-identical to those without, beside another
    request. (bf16 is emulated on CPUs without it: slow there, so --runslow.)"""
    text = "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the dog sat on the log."
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1)
    outs = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False}):
        llm = LLM(dtype=dtype, deterministic=True, max_num_seqs=2, max_model_len=256, speculative_config=spec)
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
        outs.append(llm.generate([prompt, "Count from one to ten:"], params, use_tqdm=False))
        llm.check_integrity()
    assert llm.spec_stats.accepted > 0
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids and a.outputs[0].logprobs == b.outputs[0].logprobs
