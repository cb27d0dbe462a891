"""Flash-attention backward: recompute P from the saved LSE instead of storing it.

  preprocess   D = rowsum(dO * O)  (the softmax Jacobian's diagonal term), one value per query row
  dK/dV        one program per (key tile, batch, KV head); loops over the G query heads of the KV head
               and, for each, over the query tiles that can see the tile. Summing the G heads in
               registers makes GQA deterministic with no atomics.
  dQ           one program per (query tile, batch, head); loops over the visible key tiles.

With s = scale * q.k, P = exp(s - LSE):  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),
dQ = scale * dS K,  dK = scale * dS^T Q. The sink gradient -sum_t P_sink,t * D_t is a cheap reduction
done in torch by the caller. Layout and varlen conventions as in flash_fwd.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnzoo.ops.attention.triton.flash_fwd import LOG2E, key_range, seq_bounds, visible_mask


@triton.jit
def flash_attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q, so_b, so_t, so_h, sdo_b, sdo_t, sdo_h, sl_b, sl_h, H, Tq, DV,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q0, q_len, _, _ = seq_bounds(CU_Q, CU_Q, b, Tq, Tq, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (q0 + offs_m.to(tl.int64))[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < q_len) & (offs_dv[None, :] < DV)
    o = tl.load(O + b * so_b + h * so_h + rows * so_t + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows * sdo_t + offs_dv[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b * sl_b + h * sl_h + q0 + offs_m, tl.sum(o * do, 1), mask=offs_m < q_len)


@triton.jit
def flash_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, CU_Q, CU_K,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h, sl_b, sl_h,
    Hkv, G, Tq, Tk, D, DV, scale, qk_scale, window_left, window_right,
    VARLEN: tl.constexpr, WIN_L: tl.constexpr, WIN_R: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    q0, q_len, k0, k_len = seq_bounds(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    n_start = pid_n * BLOCK_N
    if n_start >= k_len:
        return

    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_n = (k0 + offs_n.to(tl.int64))[:, None]
    k = tl.load(K + b * sk_b + hk * sk_h + rows_n * sk_t + offs_d[None, :],
                mask=(offs_n[:, None] < k_len) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + rows_n * sv_t + offs_dv[None, :],
                mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query i sees key j iff i + shift - left <= j <= i + shift + right: invert for this key tile.
    shift = k_len - q_len
    m_lo = 0
    m_hi = q_len
    if WIN_R:
        m_lo = tl.maximum(n_start - shift - window_right, 0)
    if WIN_L:
        m_hi = tl.minimum(tl.minimum(n_start + BLOCK_N, k_len) - shift + window_left, q_len)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M

    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * sq_b + h * sq_h + q0.to(tl.int64) * sq_t
        do_base = DO + b * sdo_b + h * sdo_h + q0.to(tl.int64) * sdo_t
        l_base = LSE + b * sl_b + h * sl_h + q0
        d_base = DELTA + b * sl_b + h * sl_h + q0
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + offs_m0
            rows_m = offs_m.to(tl.int64)
            in_m = offs_m < q_len
            q = tl.load(q_base + rows_m[:, None] * sq_t + offs_d[None, :],
                        mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_base + rows_m[:, None] * sdo_t + offs_dv[None, :],
                         mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
            lse = tl.load(l_base + offs_m, mask=in_m, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # dead row: all masked below; avoid inf - inf
            delta = tl.load(d_base + offs_m, mask=in_m, other=0.0)
            # Transposed tiles [BLOCK_N, BLOCK_M] so dV/dK come out as plain dots.
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            ok = tl.trans(visible_mask(offs_m, offs_n, q_len, k_len, window_left, window_right, WIN_L, WIN_R))
            pt = tl.where(ok, tl.exp2(st - lse[None, :] * LOG2E), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)

    mk = offs_n[:, None] < k_len
    tl.store(DK + b * sdk_b + hk * sdk_h + rows_n * sdk_t + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=mk & (offs_d[None, :] < D))
    tl.store(DV_ + b * sdv_b + hk * sdv_h + rows_n * sdv_t + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=mk & (offs_dv[None, :] < DV))


@triton.jit
def flash_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, sdq_b, sdq_t, sdq_h, sl_b, sl_h,
    H, G, Tq, Tk, D, DV, scale, qk_scale, window_left, window_right,
    VARLEN: tl.constexpr, WIN_L: tl.constexpr, WIN_R: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G
    q0, q_len, k0, k_len = seq_bounds(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_m = (q0 + offs_m.to(tl.int64))[:, None]
    in_m = offs_m < q_len
    q = tl.load(Q + b * sq_b + h * sq_h + rows_m * sq_t + offs_d[None, :],
                mask=in_m[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows_m * sdo_t + offs_dv[None, :],
                 mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + b * sl_b + h * sl_h + q0 + offs_m, mask=in_m, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    delta = tl.load(DELTA + b * sl_b + h * sl_h + q0 + offs_m, mask=in_m, other=0.0)
    k_base = K + b * sk_b + hk * sk_h + k0.to(tl.int64) * sk_t
    v_base = V + b * sv_b + hk * sv_h + k0.to(tl.int64) * sv_t
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = key_range(m_start, q_len, k_len, window_left, window_right, WIN_L, WIN_R, BLOCK_M, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        rows_n = offs_n.to(tl.int64)
        in_n = offs_n < k_len
        k = tl.load(k_base + rows_n[:, None] * sk_t + offs_d[None, :], mask=in_n[:, None] & (offs_d[None, :] < D),
                    other=0.0)
        v = tl.load(v_base + rows_n[:, None] * sv_t + offs_dv[None, :], mask=in_n[:, None] & (offs_dv[None, :] < DV),
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = visible_mask(offs_m, offs_n, q_len, k_len, window_left, window_right, WIN_L, WIN_R)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    tl.store(DQ + b * sdq_b + h * sdq_h + rows_m * sdq_t + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_m[:, None] & (offs_d[None, :] < D))
