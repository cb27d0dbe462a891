"""Triton flash attention and paged flash-decoding, run on CPU through the Triton interpreter.

TRITON_INTERPRET must be set when the kernels are defined (triton.jit reads it then), so this module
imports them with it set and restores the environment; a fixture sets it (and ATTNZOO_TRITON_POISON=1,
which makes every kernel output start as NaN, so a skipped element fails) around each test.

Tolerance rule (tests/ops/tolerance.py): |triton - ref64| <= 2 * |ref_same_dtype - ref64| + eps,
for outputs, LSE and every gradient.

ATTNZOO_TRITON_TEST_DEVICE=cuda runs the same cases compiled on a GPU instead (no interpreter).
"""

from __future__ import annotations


import pytest
import torch

from attnzoo.ops.attention.reference import attention_reference
from tests.ops.tolerance import close
from tests.ops.triton_env import DEVICE, INTERPRET, import_kernels, poison_outputs  # noqa: F401  (poison_outputs: an autouse fixture)

import_kernels("attnzoo.ops.attention.triton")

EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(B: int, Tq: int, Tk: int, H: int, Hkv: int, d: int, dv: int, sinks: bool, dtype: torch.dtype,
         seed: int = 0, lead: tuple[int, ...] | None = None) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if lead is None else lead
    q = torch.randn(*lead, Tq, H, d, generator=g).to(dtype)
    k = torch.randn(*lead, Tk, Hkv, d, generator=g).to(dtype)
    v = torch.randn(*lead, Tk, Hkv, dv, generator=g).to(dtype)
    s = torch.randn(H, generator=g).to(dtype) if sinks else None
    return [None if t is None else t.to(DEVICE) for t in (q, k, v, s)]


def grads(fn, ts: list[torch.Tensor | None], dout: torch.Tensor, lse_w: torch.Tensor | None, **kw):  # type: ignore[no-untyped-def]
    """(out, lse, [dq, dk, dv, dsinks]) of loss = sum(out * dout) (+ sum(finite lse * lse_w))."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]
    q, k, v, s = leaves
    out, lse = fn(q, k, v, sinks=s, return_lse=True, **kw)
    loss = (out.double() * dout.double()).sum()
    if lse_w is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse, 0).double().mul(lse_w.double()).sum()
    loss.backward()
    return out, lse, [None if t is None else t.grad for t in leaves]


def compare(ts: list[torch.Tensor | None], backward: bool, lse_grad: bool = False, **kw) -> None:  # type: ignore[no-untyped-def]
    from attnzoo.ops.attention.triton import attention_triton

    dtype = ts[0].dtype  # type: ignore[union-attr]
    eps = EPS[dtype]
    t64 = [None if t is None else t.double() for t in ts]
    if not backward:
        o, l = attention_triton(*ts[:3], sinks=ts[3], return_lse=True, **kw)
        o64, l64 = attention_reference(*t64[:3], sinks=t64[3], return_lse=True, **kw)
        os_, ls = attention_reference(*ts[:3], sinks=ts[3], return_lse=True, **kw)
        close(o, o64, os_, eps, "out")
        close(l, l64, ls, eps, "lse")
        return
    g = torch.Generator().manual_seed(7)
    o_shape = (*ts[0].shape[:-1], ts[2].shape[-1])  # type: ignore[union-attr]
    dout = torch.randn(o_shape, generator=g).to(DEVICE)
    lse_w = None
    if lse_grad:
        H, nq = ts[0].shape[-2], ts[0].shape[-3]  # type: ignore[union-attr]
        lse_shape = (H, nq) if "cu_seqlens_q" in kw else (ts[0].shape[0], H, nq)  # type: ignore[union-attr]
        lse_w = torch.randn(lse_shape, generator=g).to(DEVICE)
    o, l, gt = grads(attention_triton, ts, dout, lse_w, **kw)
    o64, l64, g64 = grads(attention_reference, t64, dout, lse_w, **kw)
    os_, ls, gs = grads(attention_reference, ts, dout, lse_w, **kw)
    close(o, o64, os_, eps, "out")
    close(l, l64, ls, eps, "lse")
    for name, a, b, c in zip(("dq", "dk", "dv", "dsinks"), gt, g64, gs):
        if b is not None:
            close(a, b, c, eps, name)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# triton 3.9's interpreter computes tl.dot on bf16 operands wrongly (a lone 16x16 bf16 dot is off by
# ~1e10), so bf16 is only checked compiled on a GPU.
BF16_CASE = pytest.mark.skipif(INTERPRET, reason="triton interpreter: tl.dot is wrong for bf16 operands")
# (B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks, dtype)
CASES = [
    (2, 1, 1, 4, 4, 64, 64, True, (-1, -1), False, F32),
    (2, 17, 17, 4, 1, 64, 64, True, (-1, -1), False, F32),       # MQA
    (1, 63, 63, 8, 2, 128, 128, False, (-1, -1), True, F32),     # GQA 4, sinks
    (1, 130, 130, 4, 1, 64, 64, True, (16, -1), False, F32),     # sliding window skips tiles
    (1, 17, 130, 4, 4, 64, 64, True, (-1, -1), True, F32),       # Tq < Tk, bottom-right causal
    (1, 130, 17, 4, 1, 64, 64, True, (-1, -1), False, F32),      # Tq > Tk: dead rows, LSE -inf
    (1, 63, 130, 4, 1, 48, 48, False, (5, 3), True, F32),        # d=48 padded to 64, two-sided window
    (1, 63, 63, 2, 2, 96, 64, False, (-1, 7), False, F32),       # d=96 padded, dv != d, right-only window
    (1, 1, 63, 4, 1, 128, 128, True, (16, -1), True, F32),       # decode row with window + sink
    (1, 63, 63, 4, 1, 64, 64, True, (-1, -1), True, F16),
    pytest.param((1, 130, 63, 4, 4, 128, 128, False, (20, 20), False, BF16), marks=BF16_CASE),
    (1, 17, 17, 2, 2, 256, 256, True, (-1, -1), False, F16),     # head dim 256
]


def _id(c: object) -> str:
    if not isinstance(c, tuple):
        return str(c)
    B, Tq, Tk, H, Hkv, d, dv, causal, w, s, dt = c
    return f"B{B}-q{Tq}-k{Tk}-H{H}:{Hkv}-d{d}:{dv}-{'c' if causal else 'nc'}-w{w[0]},{w[1]}-{'s' if s else 'ns'}-{str(dt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward(case: tuple) -> None:  # type: ignore[type-arg]
    B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks, dtype = case
    compare(make(B, Tq, Tk, H, Hkv, d, dv, sinks, dtype), False, causal=causal, window_size=window)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_backward(case: tuple) -> None:  # type: ignore[type-arg]
    B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks, dtype = case
    compare(make(B, Tq, Tk, H, Hkv, d, dv, sinks, dtype, seed=1), True, causal=causal, window_size=window)


def test_lse_gradient() -> None:
    """LSE used downstream (e.g. merging attention states): dlse folds into D."""
    compare(make(1, 63, 63, 4, 1, 64, 64, True, F32, seed=2), True, lse_grad=True, causal=True)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("causal,window,sinks", [(True, (-1, -1), False), (False, (9, 4), True)])
@pytest.mark.parametrize("rank3", [False, True])
def test_varlen(causal: bool, window: tuple[int, int], sinks: bool, rank3: bool) -> None:
    lq, lk = [1, 40, 17], [17, 33, 63]  # includes Tq < Tk and Tq > Tk sequences (dead rows)
    ts = make(1, sum(lq), sum(lk), 8, 2, 64, 64, sinks, F32, lead=() if rank3 else (1,))
    compare(ts, True, lse_grad=True, causal=causal, window_size=window, cu_seqlens_q=_cu(lq).to(DEVICE),
            cu_seqlens_k=_cu(lk).to(DEVICE))


def test_dispatcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnzoo.ops.attention import attention, resolve_backend

    q, k, v, _ = make(1, 17, 17, 4, 2, 64, 64, False, F32)
    monkeypatch.setenv("ATTNZOO_BACKEND", "triton")
    assert resolve_backend(None, q) == "triton"
    out = attention(q, k, v, causal=True)
    close(out, attention_reference(q.double(), k.double(), v.double(), causal=True),
          attention_reference(q, k, v, causal=True), EPS[F32])
    monkeypatch.delenv("ATTNZOO_BACKEND")
    assert resolve_backend(None, q) == ("torch" if INTERPRET else "triton")  # CPU default is unchanged


def test_opcheck() -> None:
    """Schema, fake (meta) kernel and autograd registration of the custom op, as torch.compile needs."""
    from attnzoo.ops.attention.triton.op import flash_attn_op

    q, k, v, s = make(1, 17, 17, 4, 2, 64, 64, True, F32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), s.requires_grad_(), None, None,  # type: ignore[union-attr]
            17, 17, 0.125, -1, 0)
    torch.library.opcheck(flash_attn_op, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))


def test_compile_eager_backend() -> None:
    """torch.compile traces through the op (aot_eager: no C++ compiler needed on CPU)."""
    from attnzoo.ops.attention.triton import attention_triton

    q, k, v, _ = make(1, 17, 17, 4, 2, 64, 64, False, F32)
    fn = torch.compile(lambda a, b, c: attention_triton(a, b, c, causal=True), backend="aot_eager", fullgraph=True)
    qq = q.clone().requires_grad_()
    out = fn(qq, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
    assert qq.grad is not None and not qq.grad.isnan().any()


# ---- paged flash-decoding ------------------------------------------------------------------------

def _paged(lens: list[int], H: int, Hkv: int, d: int, page: int, dtype: torch.dtype, sinks: bool, seed: int = 0):  # type: ignore[no-untyped-def]
    """A shuffled page pool (pages of different sequences interleave) and one decode query each."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // page) for L in lens]
    P = sum(need) + 3
    perm = torch.randperm(P, generator=g)
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    kc = torch.randn(Hkv, P, page, d, generator=g).to(dtype)
    vc = torch.randn(Hkv, P, page, d, generator=g).to(dtype)
    q = torch.randn(len(lens), H, d, generator=g).to(dtype)
    s = torch.randn(H, generator=g).to(dtype) if sinks else None
    lens_t = torch.tensor(lens, dtype=torch.int32)
    # block table and lengths stay on the host: the references and plan_paged loop over them there
    return [None if t is None else t.to(DEVICE) for t in (q, kc, vc)] + [table, lens_t] + [
        None if s is None else s.to(DEVICE)]


@pytest.mark.parametrize("sinks,window", [(False, -1), (True, -1), (False, 20), (True, 5)])
@pytest.mark.parametrize("chunk", [None, 32])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_paged_decode(sinks: bool, window: int, chunk: int | None, dtype: torch.dtype) -> None:
    from attnzoo.ops.attention.paged import paged_attention_reference
    from attnzoo.ops.attention.triton import paged_decode_triton

    q, kc, vc, table, lens, s = _paged([1, 17, 63], 8, 2, 64, 16, dtype, sinks)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32)
    out = paged_decode_triton(q, kc, vc, table.to(DEVICE), lens.to(DEVICE), sinks=s, window_left=window, chunk=chunk)
    ref = {}
    for dt in (torch.float64, dtype):
        ref[dt] = paged_attention_reference(q.to(dt), kc.to(dt), vc.to(dt), table, cu, lens, window_size=(window, 0),
                                            sinks=None if s is None else s.to(dt))
    close(out, ref[torch.float64], ref[dtype], EPS[dtype], "paged out")


def test_paged_decode_d128_empty_and_padded_heads() -> None:
    """d=128, GQA 4 (G < 16 rows padded in the tile), a sequence of length 0 (output 0), page size 16."""
    from attnzoo.ops.attention.triton import paged_decode_triton

    q, kc, vc, table, lens, s = _paged([63, 1, 17], 8, 2, 128, 16, F32, True)
    lens[1] = 0
    out = paged_decode_triton(q, kc, vc, table.to(DEVICE), lens.to(DEVICE), chunk=32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert not out.isnan().any()


@pytest.mark.parametrize("sinks,window", [(False, -1), (True, 20)])
def test_paged_attention_mixed(sinks: bool, window: int) -> None:
    """paged_attention with decode and prefill rows: on CUDA the decode rows go through the kernel."""
    from attnzoo.ops.attention.paged import paged_attention, paged_attention_reference

    lens, nq = [17, 63, 1, 40], [1, 5, 1, 1]
    q1, kc, vc, table, lens_t, s = _paged(lens, 8, 2, 64, 16, F32, sinks)
    q = torch.randn(sum(nq), 8, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cu = _cu(nq)
    kw = dict(window_size=(window, 0), sinks=s)
    out = paged_attention(q, kc, vc, table, cu, lens_t, **kw)
    t64 = [t.double() for t in (q, kc, vc)]
    ref = paged_attention_reference(*t64, table, cu, lens_t, window_size=(window, 0),
                                    sinks=None if s is None else s.double())
    same = paged_attention_reference(q, kc, vc, table, cu, lens_t, **kw)
    close(out, ref, same, EPS[F32], "paged_attention")
