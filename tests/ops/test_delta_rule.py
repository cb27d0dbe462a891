"""Gated delta rule: chunked (WY) == recurrent == the token-loop reference, both gate shapes, plus gradients,
varlen, state hand-off, the in-place decode step, and transformers' own torch ops as an outside oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.ops.delta_rule import (chunk_delta_rule, delta_rule_reference, delta_rule_step,
                                    fused_recurrent_delta_rule)

HK, HV, DK, DV = 2, 4, 8, 6  # GQA-style: value head h reads key head h // 2
F64 = dict(rtol=1e-9, atol=1e-9)


def make(B: int, T: int, *, channel: bool, seed: int, dtype=torch.float64, n_states: int | None = None,
         hk: int = HK, hv: int = HV, dk: int = DK, dv: int = DV, strong: bool = False) -> dict:
    """Fresh random inputs; log-decays -softplus(randn), or down to -5 per token with strong=True."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    gshape = (B, T, hv, dk) if channel else (B, T, hv)
    g = -5 * torch.rand(*gshape, generator=gen, dtype=torch.float64) if strong else -F.softplus(r(*gshape))
    args = dict(q=r(B, T, hk, dk), k=r(B, T, hk, dk), v=r(B, T, hv, dv), g=g,
                beta=torch.rand(B, T, hv, generator=gen, dtype=torch.float64),
                initial_state=0.3 * r(n_states or B, hv, dk, dv))
    return {name: t.to(dtype) for name, t in args.items()}


def run(fn, a: dict, **kw):
    return fn(a["q"], a["k"], a["v"], a["g"], a["beta"], initial_state=a["initial_state"], **kw)


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize("T", [1, 63, 64, 65])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunk_and_recurrent_match_reference(channel: bool, T: int, chunk: int) -> None:
    a = make(2, T, channel=channel, seed=T * 7 + chunk)
    l2 = chunk == 32  # the same cases once more with q/k normalised in the op
    ro, rs = run(delta_rule_reference, a, use_qk_l2norm=l2)
    co, cs = run(chunk_delta_rule, a, use_qk_l2norm=l2, chunk_size=chunk)
    torch.testing.assert_close(co, ro, **F64)
    torch.testing.assert_close(cs, rs, **F64)
    if chunk == 16:
        fo, fs = run(fused_recurrent_delta_rule, a, use_qk_l2norm=l2)
        torch.testing.assert_close(fo, ro, **F64)
        torch.testing.assert_close(fs, rs, **F64)


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
def test_long_sequence(channel: bool) -> None:
    a = make(1, 1000, channel=channel, seed=5, hk=1, hv=2, dk=4, dv=4)
    ro, rs = run(delta_rule_reference, a, use_qk_l2norm=True)
    for fn, kw in ((chunk_delta_rule, {}), (chunk_delta_rule, {"chunk_size": 16}), (fused_recurrent_delta_rule, {})):
        o, s = run(fn, a, use_qk_l2norm=True, **kw)
        torch.testing.assert_close(o, ro, **F64)
        torch.testing.assert_close(s, rs, **F64)


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
def test_strong_decay_is_safe_in_float32(channel: bool) -> None:
    """g down to -5 per token: over a 64-chunk e^-gam would reach e^320 (inf in fp32, even fp64 for
    longer); the chunked form must stay finite and match the float64 reference."""
    a = make(2, 130, channel=channel, seed=11, strong=True)
    ro, rs = run(delta_rule_reference, a, use_qk_l2norm=True)
    o, s = run(chunk_delta_rule, {k: t.float() for k, t in a.items()}, use_qk_l2norm=True, chunk_size=64)
    assert o.isfinite().all() and s.isfinite().all()
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.double(), rs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
def test_varlen_equals_a_loop_over_sequences(channel: bool) -> None:
    lens = [5, 0, 64, 1, 100, 33]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    a = make(1, sum(lens), channel=channel, seed=3, n_states=len(lens))
    for fn, kw in ((chunk_delta_rule, {"chunk_size": 32}), (fused_recurrent_delta_rule, {})):
        o, s = run(fn, a, cu_seqlens=cu, use_qk_l2norm=True, **kw)
        for i in range(len(lens)):
            sl = slice(int(cu[i]), int(cu[i + 1]))
            one = {n: t[:, sl] for n, t in a.items() if n != "initial_state"}
            one["initial_state"] = a["initial_state"][i:i + 1]
            ro, rs = run(delta_rule_reference, one, use_qk_l2norm=True)
            torch.testing.assert_close(o[:, sl], ro, **F64)
            torch.testing.assert_close(s[i:i + 1], rs, **F64)


def test_nan_in_one_sequence_stays_there() -> None:
    """Chunk pads read their own sequence's tokens (never a neighbour's): a NaN poisons only its sequence."""
    lens = [10, 7, 20]
    cu = torch.tensor([0, 10, 17, 37], dtype=torch.int32)
    a = make(1, sum(lens), channel=True, seed=4, n_states=3)
    a["v"][0, 12] = float("nan")  # in sequence 1
    for fn in (chunk_delta_rule, fused_recurrent_delta_rule):
        o, s = run(fn, a, cu_seqlens=cu)
        assert o[0, :10].isfinite().all() and o[0, 17:].isfinite().all() and o[0, 12:17].isnan().all()
        assert s[0].isfinite().all() and s[2].isfinite().all() and s[1].isnan().any()


@pytest.mark.parametrize("cu", [None, [0, 20, 20, 21, 53]], ids=["dense", "varlen"])
def test_every_output_row_is_written(monkeypatch, cu: list[int] | None) -> None:
    """The inference path writes into an uninitialised buffer: poisoned with NaN here, none may survive."""
    from attnzoo.ops.delta_rule import chunk as chunk_module
    monkeypatch.setattr(chunk_module, "output_buffer",
                        lambda n, h, d, like: torch.full((n, h, d), float("nan"), dtype=like.dtype))
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    a = make(1 if cu else 2, 53, channel=True, seed=19, n_states=4 if cu else None)
    ro, rs = run(delta_rule_reference, a, cu_seqlens=cu_t)
    for fn, kw in ((chunk_delta_rule, {"chunk_size": 16}), (chunk_delta_rule, {"chunk_size": 53}),
                   (fused_recurrent_delta_rule, {})):
        o, s = run(fn, a, cu_seqlens=cu_t, **kw)
        torch.testing.assert_close(o, ro, **F64)
        torch.testing.assert_close(s, rs, **F64)


@pytest.mark.parametrize("fn", [chunk_delta_rule, fused_recurrent_delta_rule], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
def test_initial_state_handoff(fn, channel: bool) -> None:
    """Two halves with the state passed on == one pass (split inside a chunk)."""
    a = make(2, 90, channel=channel, seed=8)
    kw = {"chunk_size": 16} if fn is chunk_delta_rule else {}
    o, s = run(fn, a, **kw)
    first = {n: (t if n == "initial_state" else t[:, :37]) for n, t in a.items()}
    o1, s1 = run(fn, first, **kw)
    second = {n: t[:, 37:] for n, t in a.items() if n != "initial_state"}
    o2, s2 = run(fn, {**second, "initial_state": s1}, **kw)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, **F64)
    torch.testing.assert_close(s2, s, **F64)


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_gradients_match_reference(channel: bool, varlen: bool) -> None:
    a = make(1 if varlen else 2, 37, channel=channel, seed=21, n_states=3 if varlen else None)
    cu = torch.tensor([0, 20, 21, 37], dtype=torch.int32) if varlen else None
    fns = [delta_rule_reference, chunk_delta_rule] + ([fused_recurrent_delta_rule] if not varlen else [])
    grads = []
    for fn in fns:
        leaves = {n: t.clone().requires_grad_() for n, t in a.items()}
        kw = {"chunk_size": 16} if fn is chunk_delta_rule else {}
        o, s = run(fn, leaves, cu_seqlens=cu, use_qk_l2norm=True, **kw)
        wo = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        ws = torch.cos(torch.arange(s.numel(), dtype=s.dtype)).view_as(s)
        ((o * wo).sum() + (s * ws).sum()).backward()
        grads.append({n: t.grad for n, t in leaves.items()})
    for got in grads[1:]:
        for name in a:
            torch.testing.assert_close(got[name], grads[0][name], **F64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
def test_scale_and_no_gate(channel: bool) -> None:
    a = make(2, 40, channel=channel, seed=9)
    for g in (a["g"], None):
        ro, rs = delta_rule_reference(a["q"], a["k"], a["v"], g, a["beta"], scale=0.7)
        for fn in (chunk_delta_rule, fused_recurrent_delta_rule):
            o, s = fn(a["q"], a["k"], a["v"], g, a["beta"], scale=0.7)
            torch.testing.assert_close(o, ro, **F64)
            torch.testing.assert_close(s, rs, **F64)
    assert chunk_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], output_final_state=False)[1] is None


def test_dtypes() -> None:
    a = make(1, 20, channel=False, seed=2, dtype=torch.bfloat16)
    for fn in (chunk_delta_rule, fused_recurrent_delta_rule):
        o, s = run(fn, a)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        ro, _ = run(delta_rule_reference, a)
        torch.testing.assert_close(o.float(), ro.float(), rtol=2e-2, atol=2e-2)
    o, s = run(chunk_delta_rule, make(1, 20, channel=True, seed=2))
    assert o.dtype == s.dtype == torch.float64


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
def test_decode_step_in_place(channel: bool) -> None:
    """delta_rule_step, one token at a time, writes the state in place, here a strided view into a pool
    whose other rows are NaN and must stay untouched; equals the reference."""
    a = make(3, 12, channel=channel, seed=13)
    ro, rs = run(delta_rule_reference, a, use_qk_l2norm=True)
    pool = torch.full((6, HV, DK, DV), float("nan"), dtype=torch.float64)
    pool[::2] = a["initial_state"]
    state = pool[::2]  # rows 0, 2, 4 of the pool; 1, 3, 5 stay NaN
    outs = []
    for t in range(12):
        outs.append(delta_rule_step(a["q"][:, t], a["k"][:, t], a["v"][:, t], a["g"][:, t], a["beta"][:, t],
                                    state, use_qk_l2norm=True))
    torch.testing.assert_close(torch.stack(outs, 1), ro, **F64)
    torch.testing.assert_close(pool[::2], rs, **F64)
    assert pool[1::2].isnan().all()


def test_decode_step_continues_a_chunked_prefill() -> None:
    """What the engine does: prefill with the chunked form, then decode with the step (float32 state)."""
    a = make(2, 70, channel=True, seed=17, dtype=torch.float32)
    ro, rs = run(delta_rule_reference, a, use_qk_l2norm=True)
    prefill = {n: (t if n == "initial_state" else t[:, :65]) for n, t in a.items()}
    o, state = run(chunk_delta_rule, prefill, use_qk_l2norm=True)
    steps = [delta_rule_step(a["q"][:, t], a["k"][:, t], a["v"][:, t], a["g"][:, t], a["beta"][:, t], state,
                             use_qk_l2norm=True) for t in range(65, 70)]
    torch.testing.assert_close(torch.cat([o, torch.stack(steps, 1)], 1), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, rs, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_clear_errors() -> None:
    a = make(2, 10, channel=False, seed=1)
    q, k, v, g, beta = a["q"], a["k"], a["v"], a["g"], a["beta"]
    for fn in (chunk_delta_rule, fused_recurrent_delta_rule):
        with pytest.raises(ValueError, match="q and k"):
            fn(q, k[:, :, :1], v, g, beta)
        with pytest.raises(ValueError, match="value_heads a multiple"):
            fn(q, k, v[:, :, :3], g[..., :3], beta[..., :3])
        with pytest.raises(ValueError, match="g must be"):
            fn(q, k, v, g[..., None].expand(2, 10, HV, 3), beta)
        with pytest.raises(ValueError, match="initial_state"):
            fn(q, k, v, g, beta, initial_state=torch.zeros(1, HV, DK, DV))
        with pytest.raises(ValueError, match="cu_seqlens"):
            fn(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
        with pytest.raises(ValueError, match="non-decreasing"):
            fn(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_delta_rule(q, k, v, g, beta, chunk_size=0)
    state = torch.zeros(2, HV, DK, DV)
    with pytest.raises(ValueError, match="q and k"):
        delta_rule_step(q[:, 0], k[:, 0, :1], v[:, 0], g[:, 0], beta[:, 0], state)
    with pytest.raises(ValueError, match="v must be"):
        delta_rule_step(q[:, 0], k[:, 0], v[:, 0, :3], g[:, 0], beta[:, 0], state)
    with pytest.raises(ValueError, match="beta"):
        delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0, :1], state)
    with pytest.raises(ValueError, match="g must be"):
        delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0, :1], beta[:, 0], state)
    with pytest.raises(ValueError, match="state"):
        delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state[:1])
    with pytest.raises(ValueError, match="state"):
        delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state.long())


def test_transformers_torch_ops() -> None:
    """An oracle we did not write: transformers' chunked GDN (Qwen3-Next; repeats q/k to Hv itself) and
    KDA (Kimi Linear; equal heads) torch fallbacks, with in-kernel l2norm and an initial state."""
    from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    for theirs, a in ((torch_chunk_gated_delta_rule, make(2, 50, channel=False, seed=31, dtype=torch.float32)),
                      (chunk_kimi_delta_attention, make(2, 50, channel=True, seed=32, dtype=torch.float32, hk=HV))):
        ho, hs = theirs(a["q"], a["k"], a["v"], a["g"], a["beta"], chunk_size=16, initial_state=a["initial_state"],
                        output_final_state=True, use_qk_l2norm_in_kernel=True)
        o, s = run(chunk_delta_rule, a, use_qk_l2norm=True)
        torch.testing.assert_close(o, ho, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, hs, rtol=1e-5, atol=1e-5)
