"""Reference softmax attention: the spec in code.

Naive on purpose: materialises the full [B, H, Tq, Tk] score matrix and does the softmax
in float32 (float64 for float64 inputs), so it doubles as the oracle for every fast form.
The shared helpers here (validation, the visibility mask) define the semantics; fast
forms import them so that all backends agree on what is legal and what is visible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Problem:
    """Validated call: 4-D q/k/v, plus varlen bookkeeping."""

    q: Tensor  # [B, Tq, H, d]
    k: Tensor  # [B, Tk, Hkv, d]
    v: Tensor  # [B, Tk, Hkv, dv]
    window: tuple[int, int]  # causal already folded in (right = 0)
    scale: float
    cu_q: list[int] | None  # python lists: the loops over sequences need host ints anyway
    cu_k: list[int] | None
    squeeze: bool  # caller passed rank-3 varlen tensors; return rank 3


def _shapes(**ts: Tensor | None) -> str:
    return ", ".join(f"{n}={tuple(t.shape)}" for n, t in ts.items() if t is not None)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, bad: Callable[[str], ValueError]) -> None:
    """The checks every attention op shares on [batch, seq, heads, dim] q, k, v: one batch, one q/k head
    dim, k and v aligned, query heads a multiple of KV heads, one floating dtype."""
    B, _, H, d = q.shape
    _, Tk, Hkv, dk = k.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise bad("batch sizes differ")
    if dk != d:
        raise bad("q and k head dims differ")
    if v.shape[1] != Tk or v.shape[2] != Hkv:
        raise bad("k and v must share [batch, seq, kv_heads]")
    if Hkv == 0 or H % Hkv != 0:
        raise bad(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise bad(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    window_size: tuple[int, int],
    scale: float | None,
    sinks: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
) -> Problem:
    """Validate arguments (ValueError with the shapes on any mismatch) and normalise them."""
    shapes = _shapes(q=q, k=k, v=v, sinks=sinks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)

    def bad(msg: str) -> ValueError:
        return ValueError(f"attention: {msg} (got {shapes})")

    if cu_seqlens_q is None and cu_seqlens_k is not None:
        raise bad("cu_seqlens_k given without cu_seqlens_q")
    varlen = cu_seqlens_q is not None
    squeeze = False
    if varlen:
        if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)):
            raise bad("varlen q, k, v must all be [total, heads, dim] or all [1, total, heads, dim]")
        if q.dim() == 3:
            q, k, v, squeeze = q[None], k[None], v[None], True
        if q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
            raise bad("varlen inputs must be packed into batch 1")
    elif q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise bad("q, k, v must be [batch, seq, heads, dim] (rank 3 only with cu_seqlens)")

    check_qkv(q, k, v, bad)
    B, Tq, H, d = q.shape
    Tk, Hkv = k.shape[1:3]
    if sinks is not None and (sinks.shape != (H,) or not sinks.dtype.is_floating_point):
        raise bad(f"sinks must be a float tensor of shape [{H}]")

    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise bad(f"window_size values must be >= -1, got {window_size}")
    if causal:
        right = 0

    cu_q = cu_k = None
    if varlen:
        assert cu_seqlens_q is not None
        cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, Tq), ("cu_seqlens_k", cu_seqlens_k, Tk)):
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
                raise bad(f"{name} must be int32 [N+1], got {cu.dtype} {tuple(cu.shape)}")
            vals = cu.tolist()
            if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals, vals[1:])):
                raise bad(f"{name} must rise from 0 to the packed length {total}, got {vals}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise bad("cu_seqlens_q and cu_seqlens_k hold different numbers of sequences")
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()

    return Problem(q, k, v, (left, right), 1 / math.sqrt(d) if scale is None else float(scale), cu_q, cu_k, squeeze)


def visible(Tq: int, Tk: int, window: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """Bool [Tq, Tk]: may query i read key j? Bottom-right aligned: query i sits at key a = i + Tk - Tq."""
    a = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=device)[None, :]
    left, right = window
    ok = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= a - left
    if right >= 0:
        ok &= j <= a + right
    return ok


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense(q: Tensor, k: Tensor, v: Tensor, window: tuple[int, int], scale: float, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    B, Tq, H, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    ct = compute_dtype(q.dtype)
    # Expand KV heads: query head h reads KV head h // (H // Hkv).
    kx = k.to(ct).repeat_interleave(H // Hkv, dim=2)
    vx = v.to(ct).repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), kx) * scale
    s = s.masked_fill(~visible(Tq, Tk, window, q.device), float("-inf"))

    # Softmax written out so sinks and fully masked rows follow the spec literally.
    m = s.amax(-1) if Tk > 0 else s.new_full((B, H, Tq), float("-inf"))
    if sinks is not None:
        m = torch.maximum(m, sinks.to(ct)[None, :, None].expand_as(m))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # shift only; cancels exactly
    e = torch.exp(s - m[..., None])  # masked entries -> exp(-inf) = 0
    den = e.sum(-1)
    if sinks is not None:
        den = den + torch.exp(sinks.to(ct)[None, :, None] - m)  # the sink: in the denominator, no value
    live = den > 0  # false only for a fully masked row without a sink
    den_safe = torch.where(live, den, torch.ones_like(den))
    p = e / den_safe[..., None]  # dead rows: 0 / 1 = 0, so the output row is 0
    out = torch.einsum("bhqk,bkhd->bqhd", p, vx)
    lse = torch.where(live, torch.log(den_safe) + m, torch.full_like(m, float("-inf")))
    return out.to(q.dtype), lse


def attention_form(core: Callable[..., tuple[Tensor, Tensor | None]]) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    """Give a form the public signature of `attnzoo.ops.attention.attention`. `core(p, sinks, return_lse,
    **options)` gets the checked `Problem` (rank-4 tensors; varlen packed into batch 1) and returns out
    [B, Tq, H, dv] and the LSE ([B, H, Tq]; varlen [H, total_q]; None is allowed when not return_lse).
    Validation, the rank-3 varlen squeeze and the return_lse switch live here, once for every form."""

    @functools.wraps(core)
    def form(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, window_size: tuple[int, int] = (-1, -1),
             scale: float | None = None, sinks: Tensor | None = None, cu_seqlens_q: Tensor | None = None,
             cu_seqlens_k: Tensor | None = None, return_lse: bool = False, **options: Any) -> Tensor | tuple[Tensor, Tensor]:
        p = check(q, k, v, causal, window_size, scale, sinks, cu_seqlens_q, cu_seqlens_k)
        out, lse = core(p, sinks, return_lse, **options)
        if p.squeeze:
            out = out[0]
        if not return_lse:
            return out
        assert lse is not None
        return out, lse

    return form


def per_sequence(p: Problem, run: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]
                 ) -> tuple[Tensor, Tensor | None]:
    """Varlen as one dense problem per sequence (no work or memory across sequences): `run(q, k, v)` on
    [1, L, heads, dim] slices returns (out [1, Lq, H, dv], lse [1, H, Lq] or None); the results are
    concatenated to out [1, total_q, H, dv] and lse [H, total_q]."""
    assert p.cu_q is not None and p.cu_k is not None
    res = [run(p.q[:, a:b], p.k[:, c:e], p.v[:, c:e]) for a, b, c, e in zip(p.cu_q, p.cu_q[1:], p.cu_k, p.cu_k[1:])]
    out = torch.cat([o for o, _ in res], 1)
    lses = [lse[0] for _, lse in res if lse is not None]
    return out, (torch.cat(lses, 1) if len(lses) == len(res) else None)


@attention_form
def attention_reference(p: Problem, sinks: Tensor | None, return_lse: bool) -> tuple[Tensor, Tensor]:
    """Softmax attention, flash-attn conventions; see attnzoo.ops.attention.attention."""
    if p.cu_q is None:
        return _dense(p.q, p.k, p.v, p.window, p.scale, sinks)
    out, lse = per_sequence(p, lambda q, k, v: _dense(q, k, v, p.window, p.scale, sinks))
    assert lse is not None
    return out, lse
