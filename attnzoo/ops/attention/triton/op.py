"""Triton flash attention as a torch op: `attnzoo::flash_attn` (+ its backward op), with fake
(meta) implementations so torch.compile can trace it and autograd registered on the op.

`attention_triton` has `attention_reference`'s signature; the dispatcher calls it for backend="triton".
float64 inputs go to the torch backend (Triton's fp64 dots are slow or missing; fp64 is an oracle
dtype here, not a production one).

Debug aid: ATTNZOO_TRITON_POISON=1 makes every output buffer start as NaN (instead of uninitialised),
so a kernel that skips an element fails loudly in tests.
"""

from __future__ import annotations


import torch
import triton
from torch import Tensor

from attnzoo.ops.attention.reference import Problem, attention_form
from attnzoo.ops.attention.triton.flash_bwd import (
    flash_attn_bwd_dkdv_kernel,
    flash_attn_bwd_dq_kernel,
    flash_attn_bwd_preprocess_kernel,
)
from attnzoo.ops.attention.triton.flash_fwd import flash_attn_fwd_kernel
from attnzoo.ops.triton_host import alloc, dot_precision, interpreting

LOG2E = 1.4426950408889634


def _fwd_cfg(bd: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter runs one numpy op per tile op, so
    bigger tiles are faster there, but 32 still exercises multi-tile and partial-tile paths in tests."""
    if interpreting():
        return 32, 32, 4, 1
    wide = dtype == torch.float32  # 4-byte tiles: halve the shared-memory footprint
    if bd <= 64:
        return 128, 64, 4, 2 if wide else 3
    if bd <= 128:
        return (64, 32, 4, 2) if wide else (128, 64, 8, 2)
    return (32, 32, 4, 1) if wide else (64, 32, 4, 2)


def _bwd_cfg(bd: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if interpreting():
        return 32, 32, 4, 1
    wide = dtype == torch.float32
    if bd <= 64:
        return 32, 64, 4, 2
    if bd <= 128:
        return (16, 32, 4, 1) if wide else (32, 64, 8, 2)
    return (16, 32, 8, 1) if wide else (16, 32, 8, 1)


def _strides3(t: Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides; varlen packs every sequence in batch 0, so its batch stride is 0."""
    return (0 if varlen else t.stride(0)), t.stride(1), t.stride(2)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _lse_strides(lse: Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _lse_shape(q: Tensor, varlen: bool) -> tuple[int, ...]:
    B, Tq, H, _ = q.shape
    return (H, Tq) if varlen else (B, H, Tq)


def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, cu_q: Tensor | None, cu_k: Tensor | None,
               max_q: int, max_k: int, scale: float, wl: int, wr: int) -> tuple[Tensor, Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    varlen = cu_q is not None
    B, Tq, H, d = q.shape
    Hkv, dv = k.shape[2], v.shape[-1]
    nseq = cu_q.numel() - 1 if cu_q is not None else B
    out = alloc((B, Tq, H, dv), q.dtype, q.device)
    lse = alloc(_lse_shape(q, varlen), torch.float32, q.device)
    bd = triton.next_power_of_2(d)
    bm, bn, warps, stages = _fwd_cfg(max(bd, triton.next_power_of_2(dv)), q.dtype)
    grid = (triton.cdiv(max_q, bm), nseq * H)
    if grid[0] == 0 or grid[1] == 0:
        return out, lse
    dummy = lse  # never read when the matching constexpr flag is off
    flash_attn_fwd_kernel[grid](
        q, k, v, out, lse, sinks if sinks is not None else dummy, cu_q if varlen else dummy,
        cu_k if varlen else dummy,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *_lse_strides(lse, varlen),
        H, H // Hkv, Tq, k.shape[1], d, dv, scale * LOG2E, wl, wr,
        HAS_SINKS=sinks is not None, VARLEN=varlen, WIN_L=wl >= 0, WIN_R=wr >= 0, PREC=dot_precision(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=triton.next_power_of_2(dv), num_warps=warps, num_stages=stages,
    )
    return out, lse


def _flash_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
               sinks: Tensor | None, cu_q: Tensor | None, cu_k: Tensor | None, max_q: int, max_k: int,
               scale: float, wl: int, wr: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    do, q, k, v, out = _unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
    varlen = cu_q is not None
    B, Tq, H, d = q.shape
    Tk, Hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    nseq = cu_q.numel() - 1 if cu_q is not None else B
    dq = alloc(q.shape, q.dtype, q.device)
    dk = alloc(k.shape, k.dtype, k.device)
    dvt = alloc(v.shape, v.dtype, v.device)
    delta = alloc(lse.shape, torch.float32, q.device)
    if varlen:  # rows of k that belong to no sequence get no gradient from the kernels
        dk.zero_(), dvt.zero_()
    bd, bdv = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    bm, bn, warps, stages = _bwd_cfg(max(bd, bdv), q.dtype)
    dummy = lse
    cq, ck = (cu_q, cu_k) if varlen else (dummy, dummy)
    ls = _lse_strides(lse, varlen)
    if max_q > 0 and nseq * H > 0:
        flash_attn_bwd_preprocess_kernel[(triton.cdiv(max_q, bm), nseq * H)](
            out, do, delta, cq, *_strides3(out, varlen), *_strides3(do, varlen), *ls, H, Tq, dv,
            VARLEN=varlen, BLOCK_M=bm, BLOCK_DV=bdv,
        )
        if dlse is not None:  # LSE used downstream: d lse_t / d s_tj = P_tj, i.e. D_t -= dlse_t
            delta = delta - dlse
    else:
        delta.zero_()
    common = dict(VARLEN=varlen, WIN_L=wl >= 0, WIN_R=wr >= 0, PREC=dot_precision(q.dtype),
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=warps, num_stages=stages)
    strides_in = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen))
    if max_k > 0 and nseq * Hkv > 0:
        flash_attn_bwd_dkdv_kernel[(triton.cdiv(max_k, bn), nseq * Hkv)](
            q, k, v, do, lse, delta, dk, dvt, cq, ck, *strides_in, *_strides3(dk, varlen), *_strides3(dvt, varlen),
            *ls, Hkv, H // Hkv, Tq, Tk, d, dv, scale, scale * LOG2E, wl, wr, **common,
        )
    if max_q > 0 and nseq * H > 0:
        flash_attn_bwd_dq_kernel[(triton.cdiv(max_q, bm), nseq * H)](
            q, k, v, do, lse, delta, dq, cq, ck, *strides_in, *_strides3(dq, varlen), *ls,
            H, H // Hkv, Tq, Tk, d, dv, scale, scale * LOG2E, wl, wr, **common,
        )
    if sinks is None:
        dsinks = torch.zeros(H, dtype=torch.float32, device=q.device)
    else:
        # d sink_h = -sum_t P_sink,t * D_t with P_sink = exp(sink - LSE) (D already includes -dlse).
        sk = sinks.float()[:, None] if varlen else sinks.float()[None, :, None]
        contrib = torch.exp(sk - lse) * delta
        dsinks = -(contrib.sum(1) if varlen else contrib.sum((0, 2)))
    return dq, dk, dvt, dsinks


@torch.library.custom_op("attnzoo::flash_attn", mutates_args=())
def flash_attn_op(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, cu_seqlens_q: Tensor | None,
                  cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                  window_left: int, window_right: int) -> tuple[Tensor, Tensor]:
    """q/k/v 4-D (varlen: batch 1 with cu_seqlens); window already has causal folded in -> (out, lse)."""
    return _flash_fwd(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                      window_left, window_right)


@flash_attn_op.register_fake
def _(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right):  # type: ignore[no-untyped-def]
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return out, q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.custom_op("attnzoo::flash_attn_bwd", mutates_args=())
def flash_attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
                      sinks: Tensor | None, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
                      max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
                      window_right: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dsinks [H] float32; zeros when there are no sinks)."""
    return _flash_bwd(do, q, k, v, out, lse, dlse, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      scale, window_left, window_right)


@flash_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,  # type: ignore[no-untyped-def]
      window_left, window_right):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(q.shape[2], dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, sinks, cu_q, cu_k, max_q, max_k, scale, wl, wr = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, wl, wr)


def _backward(ctx, dout: Tensor, dlse: Tensor | None):  # type: ignore[no-untyped-def]
    q, k, v, out, lse, sinks, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv, dsinks = flash_attn_bwd_op(dout, q, k, v, out, lse, dlse, sinks, cu_q, cu_k, *ctx.args)
    ds = dsinks.to(sinks.dtype) if sinks is not None and ctx.needs_input_grad[3] else None
    return dq, dk, dv, ds, None, None, None, None, None, None, None


flash_attn_op.register_autograd(_backward, setup_context=_setup_context)


@attention_form
def attention_triton(p: Problem, sinks: Tensor | None, return_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Softmax attention, flash-attn conventions; see attnzoo.ops.attention.attention.
    Varlen reads cu_seqlens on the host (check() validates them) to size the grid. float64 runs the torch form."""
    if p.q.dtype == torch.float64:
        from attnzoo.ops.attention.torch_impl import attention_torch

        return attention_torch.__wrapped__(p, sinks, return_lse)
    cu_q = cu_k = None
    max_q, max_k = p.q.shape[1], p.k.shape[1]
    if p.cu_q is not None and p.cu_k is not None:
        cu_q = torch.tensor(p.cu_q, dtype=torch.int32, device=p.q.device)
        cu_k = torch.tensor(p.cu_k, dtype=torch.int32, device=p.q.device)
        max_q = max(b - a for a, b in zip(p.cu_q, p.cu_q[1:]))
        max_k = max(b - a for a, b in zip(p.cu_k, p.cu_k[1:]))
    s = None if sinks is None else sinks.to(p.q.device)
    return flash_attn_op(p.q, p.k, p.v, s, cu_q, cu_k, max_q, max_k, p.scale, p.window[0], p.window[1])
