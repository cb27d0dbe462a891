"""Triton gated delta rule (attnzoo.ops.delta_rule.triton_kernels) vs delta_rule_reference, run on CPU through
the Triton interpreter, with ATTNZOO_TRITON_POISON=1 so every kernel output starts as NaN (an element a kernel
skips fails the no-NaN check).

Tolerance rule (tests/ops/tolerance.py): |triton - ref64| <= 2 * |ref_fp32 - ref64| + 1e-5 * max(1, |ref64|),
with ref64 the reference on float64 copies of the inputs.
ATTNZOO_TRITON_TEST_DEVICE=cuda runs the same cases compiled on a GPU instead (no interpreter).
Shapes are small (dk, dv 16-32, Hv <= 4): the interpreter runs one numpy op per tile op.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor

from attnzoo.ops.delta_rule.reference import delta_rule_reference
from tests.ops.tolerance import close
from tests.ops.triton_env import DEVICE, INTERPRET, import_kernels, poison_outputs  # noqa: F401  (poison_outputs: an autouse fixture)

(tk,) = import_kernels("attnzoo.ops.delta_rule.triton_kernels")
chunk_delta_rule_triton = tk.chunk_delta_rule_triton
delta_rule_step_triton = tk.delta_rule_step_triton
fused_recurrent_delta_rule_triton = tk.fused_recurrent_delta_rule_triton


F32, F64 = torch.float32, torch.float64
GATES = [None, "head", "channel"]


def make(B: int, T: int, Hk: int, Hv: int, dk: int, dv: int, gate: str | None, *, seed: int = 0, l2: bool = True,
         state: bool = False, n: int | None = None, strong: float = 1.0) -> dict:
    """Random inputs. Without l2norm k gets unit-ish rows (beta |k|^2 < 2 keeps the recurrence stable)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, dk, generator=gen)
    k = torch.randn(B, T, Hk, dk, generator=gen)
    if not l2:
        k = k / dk ** 0.5
    v = torch.randn(B, T, Hv, dv, generator=gen)
    beta = torch.rand(B, T, Hv, generator=gen)
    if gate == "head":
        g = -torch.rand(B, T, Hv, generator=gen) * strong
    elif gate == "channel":
        g = -torch.rand(B, T, Hv, dk, generator=gen) * strong
    else:
        g = None
    s0 = torch.randn(B if n is None else n, Hv, dk, dv, generator=gen) * 0.5 if state else None
    d = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=s0, use_qk_l2norm=l2)
    return {key: (val.to(DEVICE) if isinstance(val, Tensor) else val) for key, val in d.items()}


def args(d: dict) -> tuple:
    return d["q"], d["k"], d["v"], d["g"], d["beta"]


def kwargs(d: dict, **extra) -> dict:  # type: ignore[no-untyped-def]
    kw = {key: d[key] for key in ("initial_state", "use_qk_l2norm")}
    kw.update(extra)
    return kw


def refs(d: dict, **kw) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:  # type: ignore[no-untyped-def]
    """(float64 reference, float32 reference) -> each (o, final state)."""
    wide = {key: (val.double() if isinstance(val, Tensor) else val) for key, val in d.items()}
    return (delta_rule_reference(*args(wide), **kwargs(wide, **kw)), delta_rule_reference(*args(d), **kwargs(d, **kw)))


def check(fn, d: dict, **kw) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    ref_kw = {key: val for key, val in kw.items() if key not in ("chunk_size", "block_v")}
    (o64, s64), (o32, s32) = refs(d, **ref_kw)
    o, s = fn(*args(d), **kwargs(d, **kw))
    assert o.dtype == d["v"].dtype and s.dtype == F32
    close(o, o64, o32, what="o")
    close(s, s64, s32, what="final state")
    return o, s


# ------------------------------------------------------------------ recurrent

@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 17, 65, pytest.param(130, marks=pytest.mark.slow)])
def test_recurrent_matches_reference(gate: str | None, T: int) -> None:
    B = 2 if T <= 17 else 1
    d = make(B, T, 1, 2, 16, 32, gate, seed=T, l2=T != 17, state=T != 17)  # GQA: 2 value heads per key head
    check(fused_recurrent_delta_rule_triton, d)


def test_recurrent_dv_blocks_and_scale() -> None:
    d = make(2, 9, 2, 4, 16, 32, "channel", state=True)
    check(fused_recurrent_delta_rule_triton, d, block_v=16, scale=0.3)  # two programs per head along dv


# ------------------------------------------------------------------ chunk

@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T,C", [(1, 16), (17, 16), (64, 32), (65, 64), (130, 32)])
def test_chunk_matches_reference(gate: str | None, T: int, C: int) -> None:
    B = 2 if T <= 17 else 1
    d = make(B, T, 1, 2, 16, 32, gate, seed=T + C, l2=T != 64, state=T != 17)
    check(chunk_delta_rule_triton, d, chunk_size=C)


@pytest.mark.slow
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("C", [16, 64, 128])
def test_chunk_bigger(gate: str | None, C: int) -> None:
    d = make(2, 200, 2, 4, 32, 32, gate, seed=C, state=True)
    check(chunk_delta_rule_triton, d, chunk_size=C)


def test_chunk_dv_blocks_gqa_4_heads() -> None:
    d = make(1, 40, 2, 4, 16, 32, "head", state=True)
    check(chunk_delta_rule_triton, d, chunk_size=16, block_v=16, scale=0.7)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an overflow inside the interpreter fails the test
def test_chunk_strong_channel_decay_never_overflows() -> None:
    """Per-channel gates down to -12 per token: over a 64-token chunk e^(-gam) would be ~e^380 (inf in fp32);
    the sub-chunk reference points and masked exponents never form it."""
    d = make(1, 70, 1, 2, 16, 16, "channel", state=True, strong=12.0)
    check(chunk_delta_rule_triton, d, chunk_size=64)
    o, _ = chunk_delta_rule_triton(*args(d), **kwargs(d, chunk_size=64))
    assert torch.isfinite(o).all()


def test_chunk_matches_recurrent_without_decay_many_chunks() -> None:
    d = make(1, 100, 1, 1, 16, 16, None, l2=False)
    (o64, s64), (o32, s32) = refs(d)
    o, s = chunk_delta_rule_triton(*args(d), **kwargs(d, chunk_size=16))
    close(o, o64, o32, what="o")
    close(s, s64, s32, what="state")


# ------------------------------------------------------------------ both forms: varlen, state handoff, layout

FORMS = {"recurrent": fused_recurrent_delta_rule_triton, "chunk16": chunk_delta_rule_triton,
         "chunk32": lambda *a, **k: chunk_delta_rule_triton(*a, chunk_size=32, **k)}


@pytest.mark.parametrize("form,gate", [("recurrent", "channel"), ("chunk16", "head"), ("chunk32", "channel")])
def test_varlen(form: str, gate: str) -> None:
    """Three packed sequences of awkward lengths around one empty one; per-sequence initial and final states."""
    lens = [13, 0, 40, 6]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32).to(DEVICE)
    d = make(1, sum(lens), 1, 2, 16, 16, gate, seed=len(form), state=True, n=len(lens))
    check(FORMS[form], d, cu_seqlens=cu)
    if form != "chunk16":
        return
    # each sequence alone gives the same rows (nothing leaks across boundaries)
    o, s = FORMS[form](*args(d), **kwargs(d, cu_seqlens=cu))
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = {key: (val[:, a:b] if isinstance(val, Tensor) and key != "initial_state" else val) for key, val in d.items()}
        one["initial_state"] = d["initial_state"][i:i + 1]
        o1, s1 = FORMS[form](*args(one), **kwargs(one))
        torch.testing.assert_close(o1, o[:, a:b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s1[0], s[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_initial_state_handoff(gate: str) -> None:
    """Prefix by the chunk kernel, continuation by the recurrent one from its final state == one pass (and back)."""
    d = make(2, 45, 1, 2, 16, 16, gate, state=True)
    (o64, s64), (o32, s32) = refs(d)
    cut = 29
    first = {key: (val[:, :cut] if isinstance(val, Tensor) and key != "initial_state" else val) for key, val in d.items()}
    rest = {key: (val[:, cut:] if isinstance(val, Tensor) and key != "initial_state" else val) for key, val in d.items()}
    oa, sa = chunk_delta_rule_triton(*args(first), **kwargs(first, chunk_size=16))
    rest["initial_state"] = sa
    ob, sb = fused_recurrent_delta_rule_triton(*args(rest), **kwargs(rest))
    close(torch.cat([oa, ob], 1), o64, o32, what="o")
    close(sb, s64, s32, what="state")
    # and the other way round: recurrent prefix, chunk continuation
    oa, sa = fused_recurrent_delta_rule_triton(*args(first), **kwargs(first))
    rest["initial_state"] = sa
    ob, sb = chunk_delta_rule_triton(*args(rest), **kwargs(rest, chunk_size=32))
    close(torch.cat([oa, ob], 1), o64, o32, what="o")
    close(sb, s64, s32, what="state")


@pytest.mark.parametrize("fn", [fused_recurrent_delta_rule_triton, chunk_delta_rule_triton])
def test_non_contiguous_and_non_power_of_two_dims(fn) -> None:  # type: ignore[no-untyped-def]
    """dk = 24, dv = 20 (tiles padded to 32 with masks); inputs and initial state are strided views."""
    d = make(2, 21, 1, 2, 24, 20, "channel", state=True, l2=False)
    o1, s1 = check(fn, d)
    nc = dict(d)
    for key in ("q", "k", "v", "g", "beta"):
        nc[key] = torch.stack([d[key], d[key] + 1], -1)[..., 0]  # unit stride lost on the last dim
        assert not nc[key].is_contiguous()
    nc["initial_state"] = d["initial_state"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not nc["initial_state"].is_contiguous()
    o2, s2 = fn(*args(nc), **kwargs(nc))
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s2, s1, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fn", [fused_recurrent_delta_rule_triton, chunk_delta_rule_triton])
def test_no_final_state_and_empty(fn) -> None:  # type: ignore[no-untyped-def]
    d = make(1, 5, 1, 1, 16, 16, "head")
    o, s = fn(*args(d), **kwargs(d, output_final_state=False))
    assert s is None and not o.isnan().any()
    e = make(2, 0, 1, 2, 16, 16, "channel", state=True)
    o, s = fn(*args(e), **kwargs(e))
    assert o.shape == (2, 0, 2, 16)
    torch.testing.assert_close(s, e["initial_state"])  # nothing to read: the state passes through
    o, s = fn(*args(e), use_qk_l2norm=True)
    assert s.abs().max() == 0


@pytest.mark.parametrize("fn", [fused_recurrent_delta_rule_triton, chunk_delta_rule_triton])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(fn, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """16-bit inputs are upcast on load; o comes back in v's dtype (compare with the reference on the same inputs)."""
    d = make(1, 20, 1, 2, 16, 16, "head", state=True)
    d = {key: (val.to(dtype) if isinstance(val, Tensor) and key != "initial_state" else val) for key, val in d.items()}
    o, s = fn(*args(d), **kwargs(d))
    ro, rs = delta_rule_reference(*args(d), **kwargs(d))
    assert o.dtype == dtype and s.dtype == F32
    torch.testing.assert_close(o.float(), ro.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s, rs, atol=1e-3, rtol=1e-3)


def test_float64_runs_the_reference() -> None:
    d = make(1, 10, 1, 2, 16, 16, "channel", state=True)
    d = {key: (val.double() if isinstance(val, Tensor) else val) for key, val in d.items()}
    for fn in (fused_recurrent_delta_rule_triton, chunk_delta_rule_triton):
        o, s = fn(*args(d), **kwargs(d))
        ro, rs = delta_rule_reference(*args(d), **kwargs(d))
        assert o.dtype == F64 and torch.equal(o, ro) and torch.equal(s, rs)


def test_poison_is_on() -> None:
    """The no-NaN checks above mean something only if outputs really start as NaN."""
    assert tk.alloc((3,), F32, torch.device(DEVICE)).isnan().all()


# ------------------------------------------------------------------ autograd (reference recompute)

@pytest.mark.parametrize("fn", [fused_recurrent_delta_rule_triton, chunk_delta_rule_triton])
def test_backward_recomputes_reference(fn) -> None:  # type: ignore[no-untyped-def]
    d = make(1, 11, 1, 2, 16, 16, "channel", state=True)
    leaves = {key: (val.clone().requires_grad_() if isinstance(val, Tensor) else val) for key, val in d.items()}
    o, s = fn(*args(leaves), **kwargs(leaves))
    w_o, w_s = torch.randn_like(o), torch.randn_like(s)
    ((o * w_o).sum() + (s * w_s).sum()).backward()
    ref = {key: (val.clone().requires_grad_() if isinstance(val, Tensor) else val) for key, val in d.items()}
    ro, rs = delta_rule_reference(*args(ref), **kwargs(ref))
    ((ro * w_o).sum() + (rs * w_s).sum()).backward()
    for key in ("q", "k", "v", "g", "beta", "initial_state"):
        torch.testing.assert_close(leaves[key].grad, ref[key].grad, atol=1e-5, rtol=1e-5, msg=key)


# ------------------------------------------------------------------ decode step

def _ref_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, state: Tensor, l2: bool,
              scale: float | None = None) -> tuple[Tensor, Tensor]:
    o, s = delta_rule_reference(q[:, None], k[:, None], v[:, None], None if g is None else g[:, None], beta[:, None],
                                initial_state=state, use_qk_l2norm=l2, scale=scale)
    return o[:, 0], s


@pytest.mark.parametrize("gate", GATES)
def test_step_matches_reference_token_by_token(gate: str | None) -> None:
    B, Hk, Hv, dk, dv, steps = 3, 2, 4, 16, 32, 4
    d = make(B, steps, Hk, Hv, dk, dv, gate, seed=7, state=True)
    state = d["initial_state"].clone()
    ref = d["initial_state"].clone()
    for t in range(steps):
        q, k, v, beta = (d[key][:, t] for key in ("q", "k", "v", "beta"))
        g = None if d["g"] is None else d["g"][:, t]
        o = delta_rule_step_triton(q, k, v, g, beta, state, use_qk_l2norm=True, block_v=16)
        ro, ref = _ref_step(q, k, v, g, beta, ref, True)
        torch.testing.assert_close(o, ro, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, ref, atol=1e-5, rtol=1e-5)
    # the whole sequence at once gives the same final state
    _, s_all = fused_recurrent_delta_rule_triton(*args(d), **kwargs(d))
    torch.testing.assert_close(state, s_all, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_step_state_indices_pool(gate: str) -> None:
    """Rows of a state pool updated in place through state_indices; -1 is padding (output 0, no state touched);
    pool rows nobody names keep their (NaN) contents bit for bit."""
    B, Hk, Hv, dk, dv = 3, 1, 2, 16, 16
    d = make(B, 2, Hk, Hv, dk, dv, gate, seed=3, state=True, l2=False)
    pool = torch.full((6, Hv, dk, dv), float("nan"), device=DEVICE)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32, device=DEVICE)
    pool[4], pool[1] = d["initial_state"][0], d["initial_state"][2]
    ref = d["initial_state"].clone()
    for t in range(2):
        q, k, v, beta = (d[key][:, t] for key in ("q", "k", "v", "beta"))
        g = d["g"][:, t]
        o = delta_rule_step_triton(q, k, v, g, beta, pool, state_indices=idx, scale=0.5)
        ro, ref = _ref_step(q, k, v, g, beta, ref, False, scale=0.5)
        torch.testing.assert_close(o[[0, 2]], ro[[0, 2]], atol=1e-5, rtol=1e-5)
        assert torch.equal(o[1], torch.zeros_like(o[1]))
        torch.testing.assert_close(pool[4], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool[1], ref[2], atol=1e-5, rtol=1e-5)
        for r in (0, 2, 3, 5):
            assert pool[r].isnan().all()


def test_step_state_indices_int64_and_strided_pool() -> None:
    """A pool that is a strided view (every other slot of a bigger buffer) is written through its strides."""
    d = make(2, 1, 1, 2, 16, 16, "head", seed=5, state=True)
    big = torch.zeros(8, 2, 16, 16, device=DEVICE)
    pool = big[::2]
    assert not pool.is_contiguous()
    idx = torch.tensor([3, 0], dtype=torch.int64, device=DEVICE)
    pool[3], pool[0] = d["initial_state"][0], d["initial_state"][1]
    q, k, v, g, beta = (t[:, 0] for t in args(d))
    o = delta_rule_step_triton(q, k, v, g, beta, pool, state_indices=idx, use_qk_l2norm=True)
    ro, rs = _ref_step(q, k, v, g, beta, d["initial_state"], True)
    torch.testing.assert_close(o, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(big[6], rs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(big[0], rs[1], atol=1e-5, rtol=1e-5)
    assert big[1::2].abs().max() == 0


# ------------------------------------------------------------------ errors

def _bad(**change) -> dict:  # type: ignore[no-untyped-def]
    d = make(1, 4, 2, 4, 16, 16, "head")
    d.update(change)
    return d


@pytest.mark.parametrize("fn", [fused_recurrent_delta_rule_triton, chunk_delta_rule_triton])
@pytest.mark.parametrize("change,err,match", [
    (dict(q=torch.randn(1, 4, 2, 8)), ValueError, "q and k"),
    (dict(v=torch.randn(1, 4, 3, 16)), ValueError, "value_heads a multiple"),
    (dict(beta=torch.rand(1, 4, 1)), ValueError, "beta must be"),
    (dict(g=torch.rand(1, 4, 4, 8)), ValueError, "per key channel"),
    (dict(initial_state=torch.zeros(1, 4, 16, 8)), ValueError, "initial_state must be"),
    (dict(beta=torch.ones(1, 4, 4, dtype=torch.int64)), TypeError, "floating"),
])
def test_bad_inputs(fn, change: dict, err: type, match: str) -> None:  # type: ignore[no-untyped-def]
    d = _bad(**{key: val.to(DEVICE) for key, val in change.items()})
    with pytest.raises(err, match=match):
        fn(*args(d), **kwargs(d))


def test_bad_options() -> None:
    d = _bad()
    with pytest.raises(ValueError, match="chunk_size must be"):
        chunk_delta_rule_triton(*args(d), chunk_size=48)
    with pytest.raises(ValueError, match="block_v must be"):
        fused_recurrent_delta_rule_triton(*args(d), block_v=24)
    with pytest.raises(ValueError, match="batch must be one packed row"):
        dd = make(2, 4, 2, 4, 16, 16, None)
        chunk_delta_rule_triton(*args(dd), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        chunk_delta_rule_triton(*args(d), cu_seqlens=torch.tensor([0, 3, 2, 4], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be int"):
        fused_recurrent_delta_rule_triton(*args(d), cu_seqlens=torch.tensor([0.0, 4.0]))


def test_bad_step_inputs() -> None:
    q, k = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    v, beta, g = torch.randn(2, 2, 16), torch.rand(2, 2), -torch.rand(2, 2)
    state = torch.zeros(2, 2, 16, 16)
    with pytest.raises(TypeError, match="float32"):
        delta_rule_step_triton(q, k, v, g, beta, state.half())
    with pytest.raises(ValueError, match="state must be"):
        delta_rule_step_triton(q, k, v, g, beta, torch.zeros(2, 2, 16, 8))
    with pytest.raises(ValueError, match="q and k"):
        delta_rule_step_triton(q, k[:, :, :8], v, g, beta, state)
    with pytest.raises(ValueError, match="g must be"):
        delta_rule_step_triton(q, k, v, g[:, :1], beta, state)
    with pytest.raises(ValueError, match="state_indices must be <"):
        delta_rule_step_triton(q, k, v, g, beta, state, state_indices=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="state_indices must be an int"):
        delta_rule_step_triton(q, k, v, g, beta, state, state_indices=torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------ bench/gpu_check.py helpers (CPU)

def test_gpu_check_delta_rule_helpers() -> None:
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_dr", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.delta_state_bytes(32, 32, 128, 128) == 2 * 32 * 32 * 128 * 128 * 4
    assert mod.delta_chunk_flops(1, 64, 1, 16, 16, 64) > 0
    # 4 dk*dv matmuls per token (W S, Q S, K^T V_new, plus the intra-chunk dk + dv work): linear in T
    assert mod.delta_chunk_flops(1, 8192, 32, 128, 128, 64) == 128 * mod.delta_chunk_flops(1, 64, 32, 128, 128, 64)


# ------------------------------------------------------------------ compiled (no GPU needed)

_COMPILE = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import attnzoo.ops.delta_rule.triton_kernels as tk

P = {n: "*fp32" for n in ["O", "G", "S_IN", "S_OUT", "GAM", "AKK", "AQK", "QG", "KG", "W", "U"]}
P.update({n: "*i32" for n in ["CU", "IDX", "CSEQ", "COFF"]})
P.update({n: "i64" for n in ["si_n", "si_h", "si_k", "si_v", "so_n", "so_h", "so_k", "so_v"]})
P["scale"] = "fp32"


def build(kern, consts, warps, io):
    sig = {n: "constexpr" if n in consts else {**P, **{x: io for x in "Q K V BETA".split()}}.get(n, "i32")
           for n in kern.arg_names}
    src = ASTSource(fn=kern, signature=sig, constexprs={(kern.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})


for gk, prec, C, bk, bv, io in [(True, "tf32", 64, 128, 32, "*bf16"), (False, "ieee", 32, 64, 16, "*fp32")]:
    flags = dict(HAS_G=True, GATE_K=gk)
    build(tk.delta_rule_recurrent_kernel, dict(**flags, L2=True, HAS_S0=True, STORE_S=True, HAS_IDX=True, BK=bk,
                                                BV=bv), 4, io)
    build(tk.chunk_cumsum_kernel, dict(GATE_K=gk, C=C, BK=bk), 4, io)
    build(tk.chunk_scores_kernel, dict(**flags, L2=True, PREC=prec, C=C, BC=16, BK=bk), 8, io)
    build(tk.chunk_wu_kernel, dict(PREC=prec, C=C, BK=bk, BV=2 * bv), 8, io)
    build(tk.chunk_state_output_kernel, dict(**flags, HAS_S0=True, STORE_S=True, PREC=prec, C=C, BK=bk, BV=bv), 4, io)
print("compiled")
'''


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the kernels above ran compiled already")
def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """The interpreter does not type-check like the compiler: compile every kernel to a Hopper cubin (triton ships
    ptxas; no GPU needed), per-channel gate + tf32 + bf16 inputs at dk 128 and per-head gate + ieee + fp32."""
    import subprocess
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception:  # noqa: BLE001
        pytest.skip("this triton has no NVIDIA backend")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=300, env=env,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
