"""Flash-attention forward kernel: online softmax over K/V tiles, one program per (query tile, batch, head).

Scores are kept in base 2 (qk_scale = scale * log2 e) so the inner loop uses exp2; the saved LSE is
converted back to natural log. Head dims are padded to the next power of two (BLOCK_D) with masked
loads because `tl.arange` and `tl.dot` need power-of-two extents; the padded lanes load 0, which adds
nothing to q.k and is never stored.

Layout: q [B, Tq, H, d], k [B, Tk, Hkv, d], v [B, Tk, Hkv, dv] with unit stride on the last dim.
Varlen: B = number of sequences, the batch stride is passed as 0 and sequence b starts at row
CU_Q[b] / CU_K[b] of the packed tensor; dense calls use cu offsets 0 and lengths Tq / Tk.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def seq_bounds(CU_Q, CU_K, b, Tq, Tk, VARLEN: tl.constexpr):
    """(first query row, query count, first key row, key count) of sequence b."""
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        q_len = tl.load(CU_Q + b + 1) - q0
        k_len = tl.load(CU_K + b + 1) - k0
    else:
        q0 = tl.full([], 0, tl.int32)  # tensors, not Python ints, so callers can .to() them
        k0 = tl.full([], 0, tl.int32)
        q_len = Tq
        k_len = Tk
    return q0, q_len, k0, k_len


@triton.jit
def key_range(m_start, q_len, k_len, window_left, window_right,
              WIN_L: tl.constexpr, WIN_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of keys any query of the tile [m_start, m_start + BLOCK_M) may see; lo is tile aligned.
    Tiles outside it are fully masked and skipped (this is what makes windows and causal cheap)."""
    shift = k_len - q_len  # bottom-right alignment: query i sits at key i + shift
    lo = 0
    hi = k_len
    if WIN_L:
        lo = tl.maximum(m_start + shift - window_left, 0)
    if WIN_R:
        hi = tl.minimum(tl.minimum(m_start + BLOCK_M, q_len) - 1 + shift + window_right + 1, k_len)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def visible_mask(offs_m, offs_n, q_len, k_len, window_left, window_right, WIN_L: tl.constexpr, WIN_R: tl.constexpr):
    """Bool [M, N]: query row offs_m may read key offs_n (the spec's `visible`, plus bounds)."""
    a = offs_m[:, None] + (k_len - q_len)
    ok = (offs_n[None, :] < k_len) & (offs_m[:, None] < q_len)
    if WIN_L:
        ok = ok & (offs_n[None, :] >= a - window_left)
    if WIN_R:
        ok = ok & (offs_n[None, :] <= a + window_right)
    return ok


@triton.jit
def flash_attn_fwd_kernel(
    Q, K, V, O, LSE, SINKS, CU_Q, CU_K,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, sl_b, sl_h,
    H, G, Tq, Tk, D, DV, qk_scale, window_left, window_right,
    HAS_SINKS: tl.constexpr, VARLEN: tl.constexpr, WIN_L: tl.constexpr, WIN_R: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G  # GQA: read the shared KV head in place, never a repeated copy
    q0, q_len, k0, k_len = seq_bounds(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:  # varlen: this sequence is shorter than the longest one
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # int64 row offsets: B * T * H * d overflows int32 at realistic sizes
    rows_m = offs_m.to(tl.int64)
    q_ptrs = Q + b * sq_b + h * sq_h + (q0 + rows_m)[:, None] * sq_t + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * sk_b + hk * sk_h + k0.to(tl.int64) * sk_t
    v_base = V + b * sv_b + hk * sv_h + k0.to(tl.int64) * sv_t

    if HAS_SINKS:
        # The sink is one more logit in the denominator: start the running max/sum from it.
        sink = tl.load(SINKS + h).to(tl.float32) * LOG2E
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, hi = key_range(m_start, q_len, k_len, window_left, window_right, WIN_L, WIN_R, BLOCK_M, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        rows_n = offs_n.to(tl.int64)
        kt = tl.load(k_base + rows_n[None, :] * sk_t + offs_d[:, None],
                     mask=(offs_n[None, :] < k_len) & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        ok = visible_mask(offs_m, offs_n, q_len, k_len, window_left, window_right, WIN_L, WIN_R)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows_n[:, None] * sv_t + offs_dv[None, :],
                    mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    live = l_i > 0.0  # false only for a row that sees no key and has no sink: output 0, LSE -inf
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(live, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    o_ptrs = O + b * so_b + h * so_h + (q0 + rows_m)[:, None] * so_t + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < DV))
    tl.store(LSE + b * sl_b + h * sl_h + q0 + rows_m, lse, mask=offs_m < q_len)
