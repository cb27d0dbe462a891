"""Triton flash-decoding for MLA over a paged latent cache (contract: attnzoo.ops.latent.paged).

Grid (batch, head block, split), mirroring attention/triton/paged_decode.py: split c reads tokens
[c * CHUNK, (c + 1) * CHUNK) of its sequence through the block table and writes a partial (normalised
output, LSE); paged_decode's `split_context` sizes the splits and `combine_splits` merges them by log-sum-exp.

MQA packing: BLOCK_H query heads share the one latent key, so each program loads a [BLOCK_N, Dqk] cache
tile once and uses it three times: scores from the latent part (dv dims) plus the rope part (Dqk - dv),
then the same latent tile again as the values. Splitting Dqk at dv keeps both tiles power-of-two at the
DeepSeek shape (576 = 512 + 64) instead of padding one 576 tile to 1024.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnzoo.ops.attention.triton.flash_fwd import LN2
from attnzoo.ops.attention.triton.paged_decode import combine_splits, split_context
from attnzoo.ops.latent.reference import check_paged_decode
from attnzoo.ops.latent.torch_impl import mla_paged_decode_torch
from attnzoo.ops.triton_host import alloc, dot_precision, interpreting


@triton.jit
def mla_decode_kernel(
    Q, KV, BT, SEQ_LENS, PO, PL,
    sq_b, sq_h, skv_p, skv_s, sbt_b, spo_b, spo_h, spo_s, spl_b, spl_h,
    H, DV, DR, PAGE, CHUNK, qk_scale,
    HAS_PE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    c = tl.program_id(2)
    L = tl.load(SEQ_LENS + b).to(tl.int32)
    c0 = c * CHUNK
    c1 = tl.minimum(c0 + CHUNK, L)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_n0 = tl.arange(0, BLOCK_N)
    in_h = offs_h < H       # padded heads (H = 12 in a 16-row tile) load 0 and are never stored
    in_dv = offs_dv < DV
    in_dr = offs_dr < DR
    q_row = Q + b * sq_b + offs_h[:, None].to(tl.int64) * sq_h
    q_lat = tl.load(q_row + offs_dv[None, :], mask=in_h[:, None] & in_dv[None, :], other=0.0)
    if HAS_PE:
        q_pe = tl.load(q_row + DV + offs_dr[None, :], mask=in_h[:, None] & in_dr[None, :], other=0.0)
    m_i = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for n0 in range(c0, c1, BLOCK_N):
        offs_n = n0 + offs_n0
        in_n = offs_n < c1
        page = tl.load(BT + b * sbt_b + offs_n // PAGE, mask=in_n, other=0).to(tl.int64)
        row = KV + page * skv_p + (offs_n % PAGE).to(tl.int64) * skv_s                      # [BLOCK_N]
        kv = tl.load(row[:, None] + offs_dv[None, :], mask=in_n[:, None] & in_dv[None, :], other=0.0)
        s = tl.dot(q_lat, tl.trans(kv), input_precision=PREC)                                # [BLOCK_H, BLOCK_N]
        if HAS_PE:
            kpe = tl.load(row[:, None] + DV + offs_dr[None, :], mask=in_n[:, None] & in_dr[None, :], other=0.0)
            s += tl.dot(q_pe, tl.trans(kpe), input_precision=PREC)
        s = tl.where(in_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PREC)       # values = latent
        m_i = m_new

    # Every split writes, empty ones (0, -inf), so the combine never reads stale memory.
    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    lse = tl.where(live, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    po = PO + b * spo_b + offs_h[:, None].to(tl.int64) * spo_h + c * spo_s + offs_dv[None, :]
    tl.store(po, acc / l_safe[:, None], mask=in_h[:, None] & in_dv[None, :])
    tl.store(PL + b * spl_b + offs_h.to(tl.int64) * spl_h + c, lse, mask=in_h)


def mla_paged_decode_triton(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int,
                            scale: float, chunk: int | None = None, block_h: int | None = None) -> Tensor:
    """Same contract as mla_paged_decode_reference. chunk: tokens per split (rounded up to the key tile;
    default sized to fill the GPU); block_h: heads per program (a power of two >= 16, tl.dot's minimum M)."""
    check_paged_decode(q, cache, block_table, seq_lens, dv)
    if q.dtype == torch.float64:  # an oracle dtype, not a production one: Triton fp64 dots are slow or missing
        return mla_paged_decode_torch(q, cache, block_table, seq_lens, dv, scale)
    B, H, D = q.shape
    page = cache.shape[1]
    dr = D - dv
    out = alloc((B, H, dv), q.dtype, q.device)
    if B == 0 or H == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    cache = cache if cache.stride(-1) == 1 else cache.contiguous()
    block_table, seq_lens = block_table.to(q.device, torch.int32), seq_lens.to(q.device, torch.int32)
    # Compiled: 16 heads keep the [BLOCK_H, 512] fp32 accumulator in registers; the interpreter runs one
    # numpy op per tile op, so fewer, larger programs are faster there.
    block_h = block_h or (max(16, min(64, triton.next_power_of_2(H))) if interpreting() else 16)
    block_n = 32
    n_hb = -(-H // block_h)
    chunk, po, pl = split_context(q, block_table, page, dv, n_hb, block_n, chunk)
    mla_decode_kernel[(B, n_hb, po.shape[2])](
        q, cache, block_table, seq_lens, po, pl,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_table.stride(0),
        *po.stride()[:3], *pl.stride()[:2],
        H, dv, dr, page, chunk, float(scale) * 1.4426950408889634,
        HAS_PE=dr > 0, PREC=dot_precision(q.dtype),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=triton.next_power_of_2(dv),
        BLOCK_DR=max(16, triton.next_power_of_2(max(dr, 1))), num_warps=4,
    )
    return combine_splits(po, pl, out)
