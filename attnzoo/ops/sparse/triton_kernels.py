"""Triton select-then-attend: forward and backward, one program per (query, batch, KV head).

Group-centric (NSA / FlashMLA sparse): the program holds the G query heads of one KV head as the rows
of a [BLOCK_G, d] tile, so every gathered K/V row is loaded once and used by all G heads. It walks the
selection in tiles of BLOCK_N keys:
  token mode   tile = BLOCK_N consecutive slots of indices[b, t, g, :] (gathered rows);
  block mode   for each selected block, tiles of BLOCK_N consecutive keys (contiguous rows).
Forward: online softmax in base 2 (exp2, qk_scale = scale * log2 e) as flash_fwd, LSE saved.
Backward (one kernel, no dq/dkdv split): recompute P = exp(S - LSE), then
  dS = P * (dO V^T - D),  D = rowsum(dO * O) - dLSE  (computed by the caller),
  dQ = scale * dS K  (registers),  dK += scale * dS^T Q,  dV += P^T dO  (fp32 atomics: many queries
  select the same key, so this is a scatter; the summation order, hence the last bits, is not
  deterministic on a GPU).
tl.dot needs every extent >= 16 when compiled, so BLOCK_G >= 16 (rows past G are masked). Head dims are
padded to powers of two with masked loads, as in flash_fwd. Indices must be deduped by the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnzoo.ops.attention.triton.flash_fwd import LN2, LOG2E


@triton.jit
def _key_tile(IDX, idx_base, si_k, n0, j, r, q_pos, Tk, K, bs,
              BLOCKS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """(key positions [BLOCK_N] int64, valid [BLOCK_N]) of one tile: token mode reads slots
    n0 .. n0 + BLOCK_N of the index row; block mode reads sub-tile r of the block in slot j."""
    offs = tl.arange(0, BLOCK_N)
    if BLOCKS:
        blk = tl.load(IDX + idx_base + j * si_k).to(tl.int64)
        within = r * BLOCK_N + offs
        keys = blk * bs + within
        valid = (within < bs) & (keys >= 0) & (keys < Tk)  # keys >= 0 iff blk >= 0 (-1 slot)
    else:
        slot = n0 + offs
        keys = tl.load(IDX + idx_base + slot * si_k, mask=slot < K, other=-1).to(tl.int64)
        valid = keys >= 0
    if CAUSAL:
        valid = valid & (keys <= q_pos)
    keys = tl.where(valid, keys, 0)
    return keys, valid


@triton.jit
def sparse_attn_fwd_kernel(
    Q, K_, V, IDX, O, LSE,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_b, si_t, si_h, si_k, so_b, so_t, so_h, sl_b, sl_h,
    Hkv, G, Tq, Tk, D, DV, K, bs, n_tiles, tiles_per_block, qk_scale,
    BLOCKS: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    q_pos = t + Tk - Tq  # bottom-right alignment
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    heads = hk * G + offs_g
    in_g = offs_g < G
    q = tl.load(Q + b * sq_b + t * sq_t + heads[:, None] * sq_h + offs_d[None, :],
                mask=in_g[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K_ + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    idx_base = b * si_b + t * si_t + hk * si_h

    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for it in range(0, n_tiles):
        keys, valid = _key_tile(IDX, idx_base, si_k, it * BLOCK_N, it // tiles_per_block, it % tiles_per_block,
                                q_pos, Tk, K, bs, BLOCKS, CAUSAL, BLOCK_N)
        kt = tl.load(k_base + keys[None, :] * sk_t + offs_d[:, None],
                     mask=valid[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp2(-inf) = 0, not NaN
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + keys[:, None] * sv_t + offs_dv[None, :],
                     mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new

    live = l_i > 0.0  # false only when no selected key is valid: output 0, LSE -inf
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(live, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(O + b * so_b + t * so_t + heads[:, None] * so_h + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=in_g[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b * sl_b + heads * sl_h + t, lse, mask=in_g)


@triton.jit
def sparse_attn_bwd_kernel(
    Q, K_, V, IDX, DO, LSE, DELTA, DQ, DK, DV_,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_b, si_t, si_h, si_k, sdo_b, sdo_t, sdo_h,
    sl_b, sl_h, sdq_b, sdq_t, sdq_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
    Hkv, G, Tq, Tk, D, DV, K, bs, n_tiles, tiles_per_block, scale, qk_scale,
    BLOCKS: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    q_pos = t + Tk - Tq
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    heads = hk * G + offs_g
    in_g = offs_g < G
    q = tl.load(Q + b * sq_b + t * sq_t + heads[:, None] * sq_h + offs_d[None, :],
                mask=in_g[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdo_b + t * sdo_t + heads[:, None] * sdo_h + offs_dv[None, :],
                 mask=in_g[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + b * sl_b + heads * sl_h + t, mask=in_g, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E  # dead row: every key is masked below anyway
    delta = tl.load(DELTA + b * sl_b + heads * sl_h + t, mask=in_g, other=0.0)
    k_base = K_ + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    dk_base = DK + b * sdk_b + hk * sdk_h
    dv_base = DV_ + b * sdv_b + hk * sdv_h
    idx_base = b * si_b + t * si_t + hk * si_h
    dq = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    for it in range(0, n_tiles):
        keys, valid = _key_tile(IDX, idx_base, si_k, it * BLOCK_N, it // tiles_per_block, it % tiles_per_block,
                                q_pos, Tk, K, bs, BLOCKS, CAUSAL, BLOCK_N)
        kmask = valid[:, None] & (offs_d[None, :] < D)
        vmask = valid[:, None] & (offs_dv[None, :] < DV)
        kr = tl.load(k_base + keys[:, None] * sk_t + offs_d[None, :], mask=kmask, other=0.0)  # [BLOCK_N, BLOCK_D]
        vr = tl.load(v_base + keys[:, None] * sv_t + offs_dv[None, :], mask=vmask, other=0.0)
        s = tl.dot(q, tl.trans(kr), input_precision=PREC) * qk_scale  # [BLOCK_G, BLOCK_N]
        ok = in_g[:, None] & valid[None, :]
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vr), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kr.dtype), kr, input_precision=PREC)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC) * scale  # [BLOCK_N, BLOCK_D]
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)  # [BLOCK_N, BLOCK_DV]
        tl.atomic_add(dk_base + keys[:, None] * sdk_t + offs_d[None, :], dk, mask=kmask)
        tl.atomic_add(dv_base + keys[:, None] * sdv_t + offs_dv[None, :], dv, mask=vmask)

    tl.store(DQ + b * sdq_b + t * sdq_t + heads[:, None] * sdq_h + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_g[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------------
# torch side: autograd Function and the public triton forms


import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from attnzoo.ops.triton_host import alloc, dot_precision  # noqa: E402
from attnzoo.ops.sparse.reference import check_sparse  # noqa: E402
from attnzoo.ops.sparse.torch_impl import dedupe  # noqa: E402

_LOG2E = 1.4426950408889634


def _s3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiling(q: Tensor, v: Tensor, n_sel: int, block_size: int) -> dict[str, int]:
    """Tile sizes and the number of key tiles one program walks."""
    G = q.shape[2] // v.shape[2]
    # compiled tl.dot wants every extent >= 16 (padded lanes load 0). The MLA latent (576 / 512) pads to
    # 1024 / 512 here; a 512 + 64 split (FlashMLA) would avoid that, not done.
    bd, bdv = max(16, triton.next_power_of_2(q.shape[-1])), max(16, triton.next_power_of_2(v.shape[-1]))
    bg = max(16, triton.next_power_of_2(G))
    if block_size:  # block mode: one tile covers (part of) one selected block
        bn = max(16, min(64, triton.next_power_of_2(block_size)))
        tpb = triton.cdiv(block_size, bn)
        n_tiles = n_sel * tpb
    else:
        bn = 32 if max(bd, bdv) <= 256 else 16  # keep the gathered [BLOCK_N, d] tiles in registers
        tpb, n_tiles = 1, triton.cdiv(n_sel, bn)
    return dict(BLOCK_G=bg, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, n_tiles=n_tiles, tiles_per_block=tpb)


def _fwd(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, block_size: int, scale: float,
         causal: bool) -> tuple[Tensor, Tensor]:
    B, Tq, H, d = q.shape
    Tk, Hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = alloc((B, Tq, H, dv), q.dtype, q.device)
    lse = alloc((B, H, Tq), torch.float32, q.device)
    if B * Tq * H == 0:
        return out, lse
    cfg = _tiling(q, v, idx.shape[-1], block_size)
    n_tiles, tpb = cfg.pop("n_tiles"), cfg.pop("tiles_per_block")
    sparse_attn_fwd_kernel[(Tq, B * Hkv)](
        q, k, v, idx, out, lse, *_s3(q), *_s3(k), *_s3(v), *idx.stride(), *_s3(out), lse.stride(0), lse.stride(1),
        Hkv, H // Hkv, Tq, Tk, d, dv, idx.shape[-1], max(block_size, 1), n_tiles, tpb, scale * _LOG2E,
        BLOCKS=block_size > 0, CAUSAL=causal, PREC=dot_precision(q.dtype), **cfg,
    )
    return out, lse


def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
         block_size: int, scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    B, Tq, H, d = q.shape
    Tk, Hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    do = _unit_last(do)
    dq = alloc(q.shape, q.dtype, q.device)
    # scatter targets: fp32 and zeroed (keys no query selected get exactly 0)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dvt = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    # D = rowsum(dO * O): the softmax Jacobian's diagonal term; LSE used downstream adds -dLSE.
    delta = (do.float() * out.float()).sum(-1).permute(0, 2, 1).contiguous()  # [B, H, Tq]
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
    if B * Tq * H > 0:
        cfg = _tiling(q, v, idx.shape[-1], block_size)
        n_tiles, tpb = cfg.pop("n_tiles"), cfg.pop("tiles_per_block")
        sparse_attn_bwd_kernel[(Tq, B * Hkv)](
            q, k, v, idx, do, lse, delta, dq, dk, dvt,
            *_s3(q), *_s3(k), *_s3(v), *idx.stride(), *_s3(do), lse.stride(0), lse.stride(1),
            *_s3(dq), *_s3(dk), *_s3(dvt),
            Hkv, H // Hkv, Tq, Tk, d, dv, idx.shape[-1], max(block_size, 1), n_tiles, tpb, scale, scale * _LOG2E,
            BLOCKS=block_size > 0, CAUSAL=causal, PREC=dot_precision(q.dtype), **cfg,
        )
    return dq, dk.to(k.dtype), dvt.to(v.dtype)


class SparseAttnFn(torch.autograd.Function):
    """(q, k, v, deduped int32 indices, block_size (0 = token mode), scale, causal) -> (out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, idx, block_size, scale, causal):  # type: ignore[no-untyped-def, override]
        out, lse = _fwd(q, k, v, idx, block_size, scale, causal)
        ctx.save_for_backward(q, k, v, idx, out, lse)
        ctx.args = (block_size, scale, causal)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[no-untyped-def, override]
        q, k, v, idx, out, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(dout, q, k, v, idx, out, lse, dlse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def _call(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, block_size: int, scale: float, causal: bool,
          return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    idx = dedupe(idx.long()).to(torch.int32).contiguous()
    out, lse = SparseAttnFn.apply(q, k, v, idx, block_size, scale, causal)
    return (out, lse) if return_lse else out


def sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scale: float | None = None,
                            causal: bool = True, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Token-sparse attention; see attnzoo.ops.sparse.sparse_attention. float64 goes to the torch form
    (fp64 is an oracle dtype here; Triton's fp64 dots are slow or missing)."""
    sc = check_sparse(q, k, v, indices, scale)
    if q.dtype == torch.float64:
        from attnzoo.ops.sparse.torch_impl import sparse_attention_torch
        return sparse_attention_torch(q, k, v, indices, scale=sc, causal=causal, return_lse=return_lse)
    return _call(q, k, v, indices, 0, sc, causal, return_lse)


def block_sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_size: int, *,
                                  scale: float | None = None, causal: bool = True,
                                  return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention; see attnzoo.ops.sparse.block_sparse_attention."""
    sc = check_sparse(q, k, v, block_indices, scale, block_size=block_size, what="block_sparse_attention")
    if q.dtype == torch.float64:
        from attnzoo.ops.sparse.torch_impl import block_sparse_attention_torch
        return block_sparse_attention_torch(q, k, v, block_indices, block_size, scale=sc, causal=causal,
                                            return_lse=return_lse)
    return _call(q, k, v, block_indices, int(block_size), sc, causal, return_lse)
