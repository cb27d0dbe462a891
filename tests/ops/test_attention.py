"""Softmax attention: reference vs a hand-written float64 oracle, fast form vs reference.

Tolerance rule (tests/ops/tolerance.py): |fast - ref64| <= 2 * |ref_same_dtype - ref64| + eps, where ref64 is the
reference in float64 and ref_same_dtype is the plain reference in the input dtype. The
fast form may be at most twice as wrong as naive PyTorch, whatever the dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.ops import attention
from attnzoo.ops.attention import attention_reference, attention_torch, resolve_backend
from tests.ops.tolerance import close

Tensors = tuple[torch.Tensor, ...]


def make(
    B: int, Tq: int, Tk: int, H: int, Hkv: int, d: int, dv: int, *, sinks: bool = False,
    dtype: torch.dtype = torch.float32, seed: int = 0, batch_dim: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if batch_dim else ()
    q = torch.randn(*lead, Tq, H, d, generator=g).to(dtype)
    k = torch.randn(*lead, Tk, Hkv, d, generator=g).to(dtype)
    v = torch.randn(*lead, Tk, Hkv, dv, generator=g).to(dtype)
    s = torch.randn(H, generator=g).to(dtype) if sinks else None
    return q, k, v, s


def f64(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().double() for t in ts]


def run3(fn, q, k, v, s, **kw):  # type: ignore[no-untyped-def]
    """(fast, ref64, ref_same) outputs for one call, optionally with LSE."""
    fast = fn(q, k, v, sinks=s, **kw)
    q64, k64, v64, s64 = f64(q, k, v, s)
    ref64 = attention_reference(q64, k64, v64, sinks=s64, **kw)
    same = attention_reference(q, k, v, sinks=s, **kw)
    return fast, ref64, same


# ---------------------------------------------------------------- the reference is the spec

def test_reference_matches_hand_loops() -> None:
    B, Tq, Tk, H, Hkv, d, dv = 1, 5, 7, 4, 2, 3, 2
    q, k, v, s = make(B, Tq, Tk, H, Hkv, d, dv, sinks=True, dtype=torch.float64, seed=1)
    assert s is not None
    left, scale = 2, 0.7
    out, lse = attention_reference(q, k, v, causal=True, window_size=(left, 4), scale=scale, sinks=s, return_lse=True)
    want = torch.zeros(B, Tq, H, dv, dtype=torch.float64)
    want_lse = torch.zeros(B, H, Tq, dtype=torch.float64)
    for h in range(H):
        kh = h // (H // Hkv)
        for i in range(Tq):
            a = i + Tk - Tq  # bottom-right aligned; causal overrides right=4 with 0
            keys = [j for j in range(Tk) if a - left <= j <= a]
            logits = [scale * sum(q[0, i, h, c].item() * k[0, j, kh, c].item() for c in range(d)) for j in keys]
            den = math.exp(s[h].item()) + sum(math.exp(x) for x in logits)
            for j, x in zip(keys, logits):
                want[0, i, h] += math.exp(x) / den * v[0, j, kh]
            want_lse[0, h, i] = math.log(den)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- fast form vs reference

DENSE = [  # B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks
    (2, 1, 1, 8, 8, 64, 64, True, (-1, -1), False),
    (1, 63, 63, 9, 3, 48, 48, True, (-1, -1), False),
    (2, 75, 75, 8, 1, 64, 64, False, (-1, -1), False),
    (1, 257, 257, 9, 3, 64, 64, True, (16, 0), False),
    (1, 1, 75, 8, 1, 64, 64, True, (-1, -1), False),  # decode, MQA
    (2, 1, 75, 9, 3, 48, 48, True, (16, 0), False),  # decode, window
    (1, 1, 75, 8, 8, 64, 64, False, (7, 5), False),  # decode, two-sided window
    (1, 63, 75, 8, 8, 64, 64, True, (7, 5), False),  # causal forces right = 0
    (1, 63, 257, 9, 3, 64, 64, True, (-1, -1), False),  # causal Tq < Tk: bottom-right, not SDPA's top-left
    (1, 75, 63, 8, 2, 48, 48, False, (7, 5), False),  # Tq > Tk: first rows see nothing
    (1, 75, 63, 9, 3, 64, 32, True, (-1, -1), False),  # dv != d, dead rows
    (1, 63, 257, 8, 1, 64, 64, False, (-1, 3), True),  # sinks
    (1, 75, 75, 9, 3, 48, 48, True, (16, 0), True),  # sinks + window
    (1, 75, 63, 8, 8, 64, 64, True, (-1, -1), True),  # sinks + dead rows
]


@pytest.mark.parametrize("case", DENSE, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_fast_matches_reference(case: tuple) -> None:  # type: ignore[type-arg]
    B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks = case
    q, k, v, s = make(B, Tq, Tk, H, Hkv, d, dv, sinks=sinks)
    kw = dict(causal=causal, window_size=window)
    close(*run3(attention_torch, q, k, v, s, **kw), eps=1e-6)
    (o, l), (o64, l64), (os_, ls) = run3(attention_torch, q, k, v, s, return_lse=True, **kw)
    assert l.shape == (B, H, Tq) and l.dtype == torch.float32
    close(o, o64, os_, eps=1e-6)
    close(l, l64, ls, eps=1e-6)


def test_bf16() -> None:
    q, k, v, _ = make(1, 75, 75, 9, 3, 64, 64, dtype=torch.bfloat16)
    fast, ref64, same = run3(attention_torch, q, k, v, None, causal=True, window_size=(16, 0))
    assert fast.dtype == torch.bfloat16
    close(fast, ref64, same, eps=1e-2)  # SDPA rounds P to bf16 before P @ V


def test_fully_masked_rows_are_zero() -> None:
    # Tq > Tk causal: query i sits at key i - 6, so rows 0..5 see nothing.
    q, k, v, s = make(1, 10, 4, 4, 2, 16, 16, sinks=True)
    assert s is not None
    for fn in (attention_reference, attention_torch):
        for sinks in (None, s):
            o, lse = fn(q, k, v, causal=True, sinks=sinks, return_lse=True)
            assert o.isfinite().all() and (o[:, :6] == 0).all() and (o[:, 6:] != 0).all()
            want = torch.full((1, 4, 6), float("-inf")) if sinks is None else s[None, :, None].expand(1, 4, 6)
            assert torch.equal(lse[..., :6], want)


# ---------------------------------------------------------------- varlen

VARLEN = [  # lengths q, lengths k, causal, window, sinks, packed rank
    ([5, 63, 17], None, True, (-1, -1), False, 4),
    ([5, 63, 17], [9, 63, 30], True, (7, 0), False, 3),  # Tq != Tk per sequence
    ([5, 63, 17], [4, 70, 17], False, (-1, 3), True, 4),  # one sequence with dead rows
    ([33, 33, 33], None, False, (-1, -1), False, 3),  # equal lengths: one batched call
    ([33, 33, 33], [1, 1, 1], True, (-1, -1), True, 4),
    ([5, 0, 17], [4, 6, 0], True, (-1, -1), False, 3),  # empty query / empty key sequences
]


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("case", VARLEN, ids=str)
def test_varlen(case: tuple) -> None:  # type: ignore[type-arg]
    lq, lk, causal, window, sinks, rank = case
    lk = lq if lk is None else lk
    H, Hkv, d = 9, 3, 48
    q, k, v, s = make(1, sum(lq), sum(lk), H, Hkv, d, d, sinks=sinks)
    cu_q, cu_k = _cu(lq), _cu(lk)
    kw = dict(causal=causal, window_size=window, cu_seqlens_q=cu_q, cu_seqlens_k=None if lk is lq else cu_k)
    pq, pk, pv = (q[0], k[0], v[0]) if rank == 3 else (q, k, v)
    o, lse = attention_torch(pq, pk, pv, sinks=s, return_lse=True, **kw)
    assert o.dim() == rank and lse.shape == (H, sum(lq))
    o = o if rank == 4 else o[None]
    # Against a Python loop over sequences calling the non-varlen form.
    outs, lses = [], []
    for a, b, c, e in zip(cu_q.tolist(), cu_q[1:].tolist(), cu_k.tolist(), cu_k[1:].tolist()):
        oi, li = attention_torch(q[:, a:b], k[:, c:e], v[:, c:e], causal=causal, window_size=window, sinks=s, return_lse=True)
        outs.append(oi)
        lses.append(li[0])
    torch.testing.assert_close(o, torch.cat(outs, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, torch.cat(lses, 1), rtol=1e-6, atol=1e-6)
    # And against the reference (also varlen), with the tolerance rule.
    (fo, fl), (ro, rl), (so, sl) = run3(attention_torch, q, k, v, s, return_lse=True, **kw)
    close(fo, ro, so, eps=1e-6)
    close(fl, rl, sl, eps=1e-6)


# ---------------------------------------------------------------- gradients

GRAD = [  # B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks, varlen lengths (q, k)
    (2, 63, 63, 9, 3, 48, 48, True, (-1, -1), False, None),
    (1, 75, 63, 8, 2, 64, 32, False, (7, 5), False, None),  # dead rows
    (1, 63, 75, 8, 1, 64, 64, True, (16, 0), True, None),
    (2, 1, 75, 9, 3, 64, 64, True, (16, 0), False, None),  # decode path
    (1, 0, 0, 9, 3, 48, 48, True, (7, 0), True, ([5, 63, 17], [9, 63, 30])),
]


@pytest.mark.parametrize("case", GRAD, ids=str)
def test_gradients(case: tuple) -> None:  # type: ignore[type-arg]
    B, Tq, Tk, H, Hkv, d, dv, causal, window, sinks, lens = case
    kw: dict = dict(causal=causal, window_size=window)
    if lens is not None:
        Tq, Tk = sum(lens[0]), sum(lens[1])
        kw.update(cu_seqlens_q=_cu(lens[0]), cu_seqlens_k=_cu(lens[1]))
    q, k, v, s = make(B, Tq, Tk, H, Hkv, d, dv, sinks=sinks, seed=3)
    gout = torch.randn(B, Tq, H, dv, generator=torch.Generator().manual_seed(4))

    def grads(fn, *ts):  # type: ignore[no-untyped-def]
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ts]
        out = fn(leaves[0], leaves[1], leaves[2], sinks=leaves[3], **kw)
        (out * gout.to(out.dtype)).sum().backward()
        return [t.grad for t in leaves if t is not None]

    fast = grads(attention_torch, q, k, v, s)
    ref64 = grads(attention_reference, *f64(q, k, v, s))
    same = grads(attention_reference, q, k, v, s)
    for name, a, b, c in zip("q k v sinks".split(), fast, ref64, same):
        assert a is not None and a.isfinite().all(), name
        close(a, b, c, eps=2e-6)


# ---------------------------------------------------------------- property test

@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), Tq=st.integers(1, 40), Tk=st.integers(1, 40), Hkv=st.integers(1, 3),
    G=st.integers(1, 3), d=st.sampled_from([8, 16, 24]), causal=st.booleans(),
    left=st.integers(-1, 12), right=st.integers(-1, 12), sinks=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_fast_equals_reference(
    B: int, Tq: int, Tk: int, Hkv: int, G: int, d: int, causal: bool, left: int, right: int, sinks: bool, seed: int
) -> None:
    q, k, v, s = make(B, Tq, Tk, G * Hkv, Hkv, d, d, sinks=sinks, seed=seed)
    (o, l), (o64, l64), (os_, ls) = run3(
        attention_torch, q, k, v, s, causal=causal, window_size=(left, right), return_lse=True
    )
    close(o, o64, os_, eps=1e-6)
    close(l, l64, ls, eps=1e-6)
    o2 = attention_torch(q, k, v, sinks=s, causal=causal, window_size=(left, right))
    close(o2, o64, os_, eps=1e-6)  # the no-LSE routes (SDPA, decode)


# ---------------------------------------------------------------- validation and dispatch

@pytest.mark.parametrize(
    "shapes, kw, needle",
    [
        (((1, 4, 6, 8), (1, 4, 4, 8), (1, 4, 4, 8)), {}, "multiple of kv heads"),
        (((1, 4, 4, 8), (1, 4, 2, 16), (1, 4, 2, 16)), {}, "head dims differ"),
        (((1, 4, 4, 8), (1, 5, 2, 8), (1, 4, 2, 8)), {}, "share"),
        (((4, 4, 8), (4, 2, 8), (4, 2, 8)), {}, "rank 3 only"),
        (((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {"window_size": (-2, 0)}, ">= -1"),
        (((6, 4, 8), (6, 2, 8), (6, 2, 8)), {"cu_seqlens_q": torch.tensor([0, 2, 6])}, "int32"),
        (((6, 4, 8), (6, 2, 8), (6, 2, 8)), {"cu_seqlens_q": torch.tensor([0, 2, 5], dtype=torch.int32)}, "packed"),
        (((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {"sinks": torch.zeros(2)}, "sinks"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_validation(shapes: tuple, kw: dict, needle: str, backend: str) -> None:  # type: ignore[type-arg]
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=needle) as info:
        attention(q, k, v, causal=True, backend=backend, **kw)
    assert str(tuple(shapes[0])) in str(info.value)  # the message shows the shapes


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, _ = make(1, 9, 9, 4, 2, 16, 16)
    monkeypatch.delenv("ATTNZOO_BACKEND", raising=False)
    assert resolve_backend() == "torch"
    monkeypatch.setenv("ATTNZOO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="reference, torch"):
        attention(q, k, v, causal=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors run triton only in the interpreter
    with pytest.raises(ValueError, match="not available"):
        attention(q, k, v, causal=True, backend="triton")
    # backend= overrides the (bad) env var; both pinned forms agree.
    a = attention(q, k, v, causal=True, backend="reference")
    b = attention(q, k, v, causal=True, backend="torch")
    torch.testing.assert_close(a, b)
    monkeypatch.setenv("ATTNZOO_BACKEND", "reference")
    assert resolve_backend() == "reference"
