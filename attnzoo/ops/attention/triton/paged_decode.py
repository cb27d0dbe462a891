"""Flash-decoding over a paged, head-major KV cache: one query token per sequence.

Grid (batch, KV head, split): split c reads keys [c * CHUNK, (c + 1) * CHUNK) of its sequence through
the block table and writes a partial (normalised output, LSE); a combine kernel merges the splits by
log-sum-exp (and adds the sink to the denominator). Splitting the context is what keeps the GPU busy
when batch * heads is small and contexts are long.

GQA packing: the G query heads of one KV head are rows of one [BLOCK_G, d] tile, so each K/V byte is
loaded once per program and used by a G-row dot (BLOCK_G >= 16 because tl.dot needs M >= 16).
Cache layout: k_cache [Hkv, num_pages, page_size, d]; key j of sequence b lives at page
block_table[b, j // page_size], slot j % page_size. The query is the sequence's last token (position
seq_lens[b] - 1), so causal masking is just j < seq_lens[b]; window_left >= 0 also drops j < L-1-left.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from attnzoo.ops.attention.triton.flash_fwd import LN2
from attnzoo.ops.triton_host import alloc, dot_precision, interpreting


@triton.jit
def paged_decode_kernel(
    Q, KC, VC, BT, SEQ_LENS, PO, PL,
    sq_b, sq_h, skc_h, skc_p, skc_s, svc_h, svc_p, svc_s, sbt_b, spo_b, spo_h, spo_s, spl_b, spl_h,
    G, D, DV, PAGE, CHUNK, qk_scale, window_left,
    WIN_L: tl.constexpr, PREC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    L = tl.load(SEQ_LENS + b).to(tl.int32)
    lo = 0
    if WIN_L:
        lo = tl.maximum(L - 1 - window_left, 0)
    c0 = c * CHUNK
    c1 = tl.minimum(c0 + CHUNK, L)
    start = c0 + (tl.maximum(lo - c0, 0) // BLOCK_N) * BLOCK_N  # skip tiles left of the window

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    in_g = offs_g < G
    h = hk * G + offs_g
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + offs_d[None, :], mask=in_g[:, None] & (offs_d[None, :] < D),
                other=0.0)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    k_base = KC + hk * skc_h
    v_base = VC + hk * svc_h
    for n0 in range(start, c1, BLOCK_N):
        offs_n = n0 + offs_n0
        in_n = (offs_n < c1) & (offs_n >= lo)
        page = tl.load(BT + b * sbt_b + offs_n // PAGE, mask=in_n, other=0).to(tl.int64)
        slot = (offs_n % PAGE).to(tl.int64)
        kt = tl.load(k_base + page[None, :] * skc_p + slot[None, :] * skc_s + offs_d[:, None],
                     mask=in_n[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        s = tl.where(in_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * svc_p + slot[:, None] * svc_s + offs_dv[None, :],
                    mask=in_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    # Every split writes, empty ones (0, -inf), so the combine never reads stale memory.
    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    lse = tl.where(live, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    po = PO + b * spo_b + h[:, None] * spo_h + c * spo_s + offs_dv[None, :]
    tl.store(po, acc / l_safe[:, None], mask=in_g[:, None] & (offs_dv[None, :] < DV))
    tl.store(PL + b * spl_b + h * spl_h + c, lse, mask=in_g)


@triton.jit
def paged_decode_combine_kernel(
    PO, PL, SINKS, OUT, spo_b, spo_h, spo_s, spl_b, spl_h, so_b, so_h, H, S, DV,
    HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_s = offs_s < S
    lse = tl.load(PL + b * spl_b + h * spl_h + offs_s, mask=in_s, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h).to(tl.float32)
        m = tl.maximum(m, sink)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_use)  # empty splits: exp(-inf) = 0
    den = tl.sum(w, 0)
    if HAS_SINKS:
        den += tl.exp(sink - m_use)  # the sink joins the denominator and carries no value
    o = tl.load(PO + b * spo_b + h * spo_h + offs_s[:, None] * spo_s + offs_dv[None, :],
                mask=in_s[:, None] & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)  # no key, no sink: 0
    tl.store(OUT + b * so_b + h * so_h + offs_dv, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)


def paged_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                        scale: float | None = None, sinks: Tensor | None = None, window_left: int = -1,
                        chunk: int | None = None) -> Tensor:
    """q [B, H, d] (each sequence's last token), k_cache/v_cache [Hkv, pages, page_size, d/dv], block_table
    [B, max_pages] int, seq_lens [B] (keys per sequence, the query's own included) -> [B, H, dv] in q's dtype.
    chunk: keys per split (a multiple of the key tile); by default sized to fill the GPU."""
    B, H, d = q.shape
    Hkv, _, page, _ = k_cache.shape
    dv = v_cache.shape[-1]
    if H % Hkv or k_cache.shape[-1] != d or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"paged_decode_triton: bad shapes q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    G = H // Hkv
    scale = d ** -0.5 if scale is None else float(scale)
    out = alloc((B, H, dv), q.dtype, q.device)
    if B == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    block_table, seq_lens = block_table.to(q.device, torch.int32), seq_lens.to(q.device, torch.int32)
    block_n = 32 if interpreting() else 64
    chunk, po, pl = split_context(q, block_table, page, dv, Hkv, block_n, chunk)
    paged_decode_kernel[(B, Hkv, po.shape[2])](
        q, k_cache, v_cache, block_table, seq_lens, po, pl,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        *po.stride()[:3], *pl.stride()[:2],
        G, d, dv, page, chunk, scale * 1.4426950408889634, window_left,
        WIN_L=window_left >= 0, PREC=dot_precision(q.dtype),
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv),
        num_warps=4,
    )
    return combine_splits(po, pl, out, sinks)


def split_context(q: Tensor, block_table: Tensor, page: int, dv: int, programs: int, block_n: int,
                  chunk: int | None) -> tuple[int, Tensor, Tensor]:
    """Split-context decoding's plan for q [B, H, ...]: keys per split (by default ~2 waves of programs over
    the SMs, `programs` per sequence, never less than one key tile per split; rounded up to the tile) and the
    splits' partial outputs [B, H, S, dv] and LSEs [B, H, S] (float32). The block table's width bounds the
    longest sequence: no device sync."""
    B, H = q.shape[:2]
    max_len = max(block_table.shape[1] * page, 1)
    if chunk is None:
        sms = 1 if interpreting() else torch.cuda.get_device_properties(q.device).multi_processor_count
        want = max(1, min(-(-2 * sms // (B * programs)), -(-max_len // block_n)))
        chunk = -(-max_len // want)
    chunk = -(-chunk // block_n) * block_n
    S = -(-max_len // chunk)
    return chunk, alloc((B, H, S, dv), torch.float32, q.device), alloc((B, H, S), torch.float32, q.device)


def combine_splits(po: Tensor, pl: Tensor, out: Tensor, sinks: Tensor | None = None) -> Tensor:
    """Merge the splits' partials (`split_context`) into out [B, H, dv] by log-sum-exp, the sinks (per head)
    joining the denominator."""
    B, H, S, dv = po.shape
    paged_decode_combine_kernel[(B, H)](
        po, pl, sinks.to(po.device) if sinks is not None else pl, out, *po.stride()[:3], *pl.stride()[:2],
        out.stride(0), out.stride(1), H, S, dv,
        HAS_SINKS=sinks is not None, BLOCK_S=triton.next_power_of_2(S), BLOCK_DV=triton.next_power_of_2(dv),
    )
    return out
