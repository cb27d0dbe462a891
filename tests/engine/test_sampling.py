from __future__ import annotations

import math

import pytest
import torch

from attnzoo.engine.sampling import Sampler, SamplingParams, SamplingRow, make_generator

V = 32


def row(prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> SamplingRow:
    p = SamplingParams(**kw)
    return SamplingRow(p, make_generator(p), prompt or [1, 2], output or [])


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n must"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 20}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"stop": ""}, "stop"), ({"stop": ["ok", ""]}, "stop"),
])
def test_bad_field_raises_naming_it(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_validate_with_context():
    p = SamplingParams(max_tokens=10, stop_token_ids=[5], stop="x")
    assert p.stop == ["x"] and SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    p.validate(vocab_size=V, max_model_len=20, prompt_len=10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        p.validate(vocab_size=4)
    with pytest.raises(ValueError, match=r"max_tokens \(10\) plus the prompt \(11 tokens\) exceeds the model's "
                                         r"context of 20 tokens"):
        p.validate(max_model_len=20, prompt_len=11)
    SamplingParams(top_k=-1)


def test_greedy_is_exact_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, V, dtype=torch.bfloat16)
    res = Sampler()(logits, [row(temperature=0) for _ in range(6)], eos_token_ids=[0])
    assert res.token_ids == logits.argmax(-1).tolist()
    assert res.logprobs == [None] * 6 and res.sampled_logprobs == [None] * 6


def test_top_k_1_is_greedy_at_any_temperature():
    torch.manual_seed(1)
    logits = torch.randn(5, V)
    rows = [row(temperature=t, top_k=1) for t in (0.5, 1.0, 2.0, 10.0, 100.0)]
    for _ in range(5):
        assert Sampler()(logits, rows, []).token_ids == logits.argmax(-1).tolist()


def draws(logits: torch.Tensor, n: int = 400, **kw) -> set[int]:
    s, rows = Sampler(torch.Generator().manual_seed(0)), [row(**kw)]
    return {s(logits[None], rows, []).token_ids[0] for _ in range(n)}


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    assert draws(logits, top_p=0.7) == {1, 2}
    assert draws(logits, top_p=0.85) == {1, 2, 3}  # 0.8 < 0.85 so the third token is needed
    assert draws(logits) == {0, 1, 2, 3}


def test_min_p_and_top_k_exclude_low_probability_tokens():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.05, 0.25]))
    assert draws(logits, min_p=0.5) == {0, 1, 3}   # 0.05 < 0.5 * 0.4
    assert draws(logits, min_p=0.7) == {0, 1}      # 0.25 < 0.28
    assert draws(logits, top_k=2) == {0, 1}


def test_penalties_follow_the_formulas():
    torch.manual_seed(2)
    logits = torch.randn(2, V) * 3
    rows = [row(prompt=[3, 4], output=[4, 5, 5, 5], repetition_penalty=1.7),
            row(prompt=[3, 4], output=[4, 5, 5, 6], presence_penalty=0.5, frequency_penalty=0.25)]
    out = Sampler().process_logits(logits, rows, eos_token_ids=[0])
    want = logits.clone()
    for t in (3, 4, 5):  # prompt + output tokens
        want[0, t] = logits[0, t] / 1.7 if logits[0, t] > 0 else logits[0, t] * 1.7
    for t, count in ((4, 1), (5, 2), (6, 1)):  # output tokens only: prompt token 3 untouched
        want[1, t] = logits[1, t] - 0.5 - 0.25 * count
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert not (out[:, 7:] != logits[:, 7:]).any()  # untouched tokens exact
    # Defaults change nothing at all.
    assert torch.equal(Sampler().process_logits(logits, [row(), row()], [0]), logits)


@pytest.mark.parametrize("kw", [{"repetition_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.0}])
def test_penalty_flips_greedy_choice(kw):
    logits = torch.zeros(1, V)
    logits[0, 7], logits[0, 9] = 3.0, 2.0
    assert Sampler()(logits, [row(temperature=0)], []).token_ids == [7]
    assert Sampler()(logits, [row(output=[7, 7], temperature=0, **kw)], []).token_ids == [9]


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 0], logits[0, 5], logits[0, 8] = 10.0, 9.0, 1.0
    kw = dict(temperature=0, min_tokens=3, stop_token_ids=[5], ignore_eos=True)
    assert Sampler()(logits, [row(output=[1, 1], **kw)], [0]).token_ids == [8]
    assert Sampler()(logits, [row(output=[1, 1, 1], **kw)], [0]).token_ids == [0]
    assert logits[0, 0] == 10.0  # the caller's logits are not modified


def test_logprobs_are_raw_and_include_the_sampled_token():
    torch.manual_seed(3)
    logits = torch.randn(3, V) * 0.1  # small spread: a presence penalty of 2 moves the choice out of the top 3
    top3 = logits[0].topk(3).indices.tolist()
    rows = [row(temperature=0, logprobs=3, presence_penalty=2.0, output=top3),
            row(temperature=0.7, logprobs=0, seed=1), row(temperature=0.7)]
    res = Sampler()(logits, rows, [])
    ref = torch.log_softmax(logits, -1)
    top = ref[0].topk(3)
    for t, v in zip(top.indices.tolist(), top.values.tolist()):
        assert res.logprobs[0][t] == pytest.approx(v, abs=1e-6)
    assert res.token_ids[0] not in top3
    assert len(res.logprobs[0]) == 4 and res.token_ids[0] in res.logprobs[0]
    assert res.logprobs[1] == {res.token_ids[1]: pytest.approx(float(ref[1, res.token_ids[1]]), abs=1e-6)}
    assert res.sampled_logprobs[0] == pytest.approx(float(ref[0, res.token_ids[0]]), abs=1e-6)
    assert res.logprobs[2] is None and res.sampled_logprobs[2] is None


def seeded_run(seed: int, position: int, batch: int, steps: int = 12) -> list[int]:
    """Tokens of a seeded request placed at `position` among unseeded random rows."""
    torch.manual_seed(100 + position + batch)  # other rows' logits and params differ per layout
    p = SamplingParams(temperature=1.3, top_p=0.9, seed=seed)
    target, out = SamplingRow(p, make_generator(p), [1], []), []
    sampler = Sampler(torch.Generator().manual_seed(position))
    gen = torch.Generator().manual_seed(seed + 999)  # the request's logits depend only on its own step
    for _ in range(steps):
        mine = torch.randn(V, generator=gen)
        logits = torch.randn(batch, V)
        logits[position] = mine
        rows = [row(temperature=1.0, top_k=5) for _ in range(batch)]
        rows[position] = target
        tok = sampler(logits, rows, []).token_ids[position]
        target.output_ids.append(tok)
        out.append(tok)
    return out


def test_seeded_request_is_batch_independent():
    alone = seeded_run(seed=42, position=0, batch=1)
    assert seeded_run(seed=42, position=2, batch=4) == alone
    assert seeded_run(seed=42, position=3, batch=4) == alone
    assert seeded_run(seed=43, position=0, batch=1) != alone


# ---- speculative verification (Sampler.verify) ----------------------------------------------------

CHI2_DF5_P001 = 20.52   # chi-square critical value, 5 degrees of freedom, p = 0.001


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_verify_greedy_keeps_the_agreeing_prefix_plus_one():
    logits = torch.randn(7, V)
    best = logits.argmax(-1).tolist()
    drafts = [[best[0], best[1], (best[2] + 1) % V], [best[4], best[5]]]   # 2 kept, then a miss; all 2 kept
    rows = [row(temperature=0)] * 7
    emitted, res = Sampler().verify(logits, rows, [], drafts)
    assert emitted == [best[:3], best[4:7]]
    assert res.token_ids == best[:3] + best[4:7]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 4)])
def test_verify_sampled_keeps_the_target_distribution(temperature, top_k):
    """A request with drafts [d0, d1] over a 6-token vocabulary: its first emitted token is distributed as row 0's
    target distribution and, given the first was d0, its second as row 1's, whatever the drafts (one likely,
    one unlikely under the target)."""
    v = 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, v, generator=g) * 1.5
    params = SamplingParams(temperature=temperature, top_k=top_k)
    target = Sampler.filter_logits(logits, [params] * 3).softmax(-1) if top_k else (logits / temperature).softmax(-1)
    d0, d1 = int(target[0].argmax()), int(target[1].argmin())
    sampler = Sampler(torch.Generator().manual_seed(1))
    first, second = torch.zeros(v), torch.zeros(v)
    batch = 500                                           # requests per verify call, all alike
    rows = [SamplingRow(params, None, [1], [])] * 3 * batch
    for _ in range(6):
        for out in sampler.verify(logits.repeat(batch, 1), rows, [], [[d0, d1]] * batch)[0]:
            first[out[0]] += 1
            if out[0] == d0:
                second[out[1]] += 1
    for counts, p in ((first, target[0]), (second, target[1])):
        keep = p > 0
        assert not counts[~keep].any()                    # nothing outside the target's support
        assert _chi2(counts[keep], p[keep]) < CHI2_DF5_P001, (counts, p)
