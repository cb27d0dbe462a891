"""Triton kernels for the gated delta rule (GDN / KDA; docs/mechanisms/delta_rule.md §6), same contract as
`delta_rule_reference` (CUDA; CPU tensors under TRITON_INTERPRET=1 for tests).

* `fused_recurrent_delta_rule_triton`: one program per (sequence, value head, dv block) holds its state tile
  [dk, BV] in fp32 registers and walks the sequence's tokens: decay, delta-rule update, read out.
* `delta_rule_step_triton`: one decode token per sequence, updating a state (or rows of a state pool through
  `state_indices`, vLLM style) in place; the same kernel with T = 1.
* `chunk_delta_rule_triton`: the chunked WY form (docs/mechanisms/delta_rule.md §3) in four kernels:
    0. per (chunk, head): cumulative log-decay gam inside the chunk (cumsum of g);
    1. per (chunk, head): A = strictly-lower beta_i k_i.k_j e^(gam_i-gam_j) and Aqk = (q_i.k_j) e^(gam_i-gam_j)
       (j <= i), in sub-chunks of 16 rows (below); plus the gated operands QG = e^gam (scale q),
       KG = e^(gam_last - gam) k and beta e^gam k (l2norm done here, once);
    2. per (chunk, head): T = (I + A)^-1 by forward substitution in registers, W = T (beta e^gam K),
       U = T (beta V);
    3. per (sequence, head, dv block): sequential over the chunks carrying S in registers, matmuls only:
       V_new = U - W S, O = QG S + Aqk V_new, S = e^gam_last S + KG^T V_new.
  Kernels 0-2 write fp32 scratch indexed by padded row (global chunk * C + row in chunk), about
  (3 dk + dv + 2 C) floats per (token, value head) (+ dk for gam with KDA); rows past a sequence's end load
  k = v = beta = g = 0, which leaves the state untouched. Host work: one sync to read cu_seqlens.
  Untuned: compiled and register-checked for sm_90 (ptxas, no GPU), never timed; see bench/gpu_check.py.

Per-channel (KDA) gates: e^(gam_i - gam_j) does not factor out of Q K^T as a [C, C] mask, and the factored
form (Q e^gam)(K e^-gam)^T overflows. Kernel 1 therefore splits the chunk into 16-row sub-chunks: an
off-diagonal block (I > J) uses the reference point gn = gam at the first row of I, so both factors
e^(gam_i - gn) and e^(gn - gam_j) have exponents <= 0 (gates are log-decays, g <= 0) and the block is one
tl.dot; a diagonal block is built column by column, sum_c q_i[c] k_j[c] e^(gam_i[c] - gam_j[c]) with the
exponent of every masked (j > i) entry replaced by -inf before exp. The scalar (GDN) gate is the special
case with an exact [16, 16] mask.

Shapes: q, k [B, T, Hk, dk]; v [B, T, Hv, dv] (value head h reads key head h // (Hv / Hk)); g None,
[B, T, Hv] or [B, T, Hv, dk]; beta [B, T, Hv]; states [N, Hv, dk, dv] float32; varlen = B 1 packed rows
+ cu_seqlens. Any dk, dv: tiles are padded to the next power of two (>= 16) with masked loads. Inputs are
made contiguous (the states are read and written through their strides, so a state pool is never copied).
Compute is fp32 (fp32 inputs use exact "ieee" dots; fp16/bf16 inputs are upcast on load and use tf32 dots);
float64 inputs, an oracle dtype, run `delta_rule_reference` instead.

Autograd: there is no Triton backward. If an input requires grad (and grad mode is on), the call goes
through an autograd Function whose backward recomputes the forward in PyTorch (`chunk_delta_rule`, the
differentiable chunked form; `delta_rule_reference` if that is missing) and differentiates it. Correct, but
it is a second, slower forward plus PyTorch's backward: fine for checks and fine-tuning small models, not a
training kernel.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from attnzoo.ops.delta_rule.reference import check_inputs, check_step_inputs, delta_rule_reference
from attnzoo.ops.triton_host import alloc, dot_precision, interpreting

SUB: int = 16  # sub-chunk rows of kernel 1 (tl.dot's minimum M/N/K)


# ------------------------------------------------------------------ jit helpers

@triton.jit
def _rows(ptr, rows, valid, row_stride, offs, D):
    """Load [len(rows), len(offs)] as fp32: rows * row_stride + offs, zero outside (valid, offs < D)."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * row_stride + offs[None, :],
                   mask=valid[:, None] & (offs[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _qk_rows(ptr, rows, valid, row_stride, offs, D, scale, L2: tl.constexpr):
    """q or k rows, optionally l2-normalised (x / sqrt(sum x^2 + 1e-6), as the reference) then scaled."""
    x = _rows(ptr, rows, valid, row_stride, offs, D)
    if L2:
        x = x * tl.rsqrt(tl.sum(x * x, 1) + 1e-6)[:, None]
    return x * scale


@triton.jit
def _qk_vec(ptr, row, end, row_stride, offs, D, scale, L2: tl.constexpr):
    """One q or k row (zeros when row >= end); the row test is per lane: the interpreter rejects a 0-d mask."""
    x = tl.load(ptr + row.to(tl.int64) * row_stride + offs, mask=(offs < D) & ((offs * 0 + row) < end),
                other=0.0).to(tl.float32)
    if L2:
        x = x * tl.rsqrt(tl.sum(x * x, 0) + 1e-6)
    return x * scale


@triton.jit
def _chunk_start(CU, CSEQ, COFF, c, C: tl.constexpr):
    """(first token, end token) of global chunk c: sequence n = CSEQ[c], chunk c - COFF[n] of it."""
    n = tl.load(CSEQ + c)
    eos = tl.load(CU + n + 1)
    t0 = tl.load(CU + n) + (c - tl.load(COFF + n)) * C
    return t0, eos


# ------------------------------------------------------------------ recurrent kernel

@triton.jit
def delta_rule_recurrent_kernel(
    Q, K, V, G, BETA, O, S_IN, S_OUT, CU, IDX,
    si_n, si_h, si_k, si_v, so_n, so_h, so_k, so_v,
    HV, R, DK, DV, scale,
    HAS_G: tl.constexpr, GATE_K: tl.constexpr, L2: tl.constexpr, HAS_S0: tl.constexpr, STORE_S: tl.constexpr,
    HAS_IDX: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    n = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    hk = h // R  # GQA: value head h reads key head h // (Hv / Hk)
    bos = tl.load(CU + n)
    eos = tl.load(CU + n + 1)
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    q_base = Q + hk * DK
    k_base = K + hk * DK
    v_base = V + h * DV
    o_base = O + h * DV
    row_qk = DK * (HV // R)
    row_v = DV * HV
    if HAS_IDX:
        slot = tl.load(IDX + n).to(tl.int64)
    else:
        slot = n.to(tl.int64)
    # a negative state index is a padding entry: state untouched, output 0 (a [BV] vector, not a scalar:
    # the interpreter rejects a 0-d mask broadcast into a tile)
    live = (offs_v * 0 + slot) >= 0
    mask_s = mk[:, None] & (mv & live)[None, :]
    if HAS_S0:
        s = tl.load(S_IN + slot * si_n + h * si_h + offs_k[:, None].to(tl.int64) * si_k
                    + offs_v[None, :].to(tl.int64) * si_v, mask=mask_s, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    bos64 = bos.to(tl.int64)
    for i in range(0, eos - bos):  # (the interpreter's loop variables are Python ints: no .to on them)
        t64 = bos64 + i
        q = _qk_vec(q_base, t64, eos, row_qk, offs_k, DK, scale, L2)
        k = _qk_vec(k_base, t64, eos, row_qk, offs_k, DK, 1.0, L2)
        v = tl.load(v_base + t64 * row_v + offs_v, mask=mv, other=0.0).to(tl.float32)
        beta = tl.load(BETA + t64 * HV + h).to(tl.float32)
        if HAS_G:
            if GATE_K:
                gk = tl.load(G + (t64 * HV + h) * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
                s = s * tl.exp(gk)[:, None]  # rows (key channels) decay
            else:
                s = s * tl.exp(tl.load(G + t64 * HV + h).to(tl.float32))
        u = beta * (v - tl.sum(s * k[:, None], 0))  # beta (v - S^T k)
        s = s + k[:, None] * u[None, :]
        o = tl.where(live, tl.sum(s * q[:, None], 0), 0.0)  # S^T (scale q)
        tl.store(o_base + t64 * row_v + offs_v, o.to(O.dtype.element_ty), mask=mv)
    if STORE_S:
        tl.store(S_OUT + slot * so_n + h * so_h + offs_k[:, None].to(tl.int64) * so_k
                 + offs_v[None, :].to(tl.int64) * so_v, s, mask=mask_s)


# ------------------------------------------------------------------ chunk kernels

@triton.jit
def chunk_cumsum_kernel(G, GAM, CU, CSEQ, COFF, HV, DK,
                        GATE_K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """gam[c * C + i] = sum_{u <= i} g[t0 + u] (zeros past the sequence end: gam stays at its last value)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    t0, eos = _chunk_start(CU, CSEQ, COFF, c, C)
    offs_c = tl.arange(0, C)
    rows = t0 + offs_c
    valid = rows < eos
    p = (c * C + offs_c).to(tl.int64)
    if GATE_K:
        offs_k = tl.arange(0, BK)
        g = _rows(G + h * DK, rows, valid, HV * DK, offs_k, DK)
        gam = tl.cumsum(g, 0)
        tl.store(GAM + (p * HV + h)[:, None] * DK + offs_k[None, :], gam, mask=offs_k[None, :] < DK)
    else:
        g = tl.load(G + rows.to(tl.int64) * HV + h, mask=valid, other=0.0).to(tl.float32)
        tl.store(GAM + p * HV + h, tl.cumsum(g, 0))


@triton.jit
def chunk_scores_kernel(
    Q, K, BETA, GAM, AKK, AQK, QG, KG, W, CU, CSEQ, COFF,
    HV, R, DK, scale,
    HAS_G: tl.constexpr, GATE_K: tl.constexpr, L2: tl.constexpr, PREC: tl.constexpr,
    C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    """A[i, j] = beta_i k_i.k_j e^(gam_i - gam_j) (j < i) and Aqk[i, j] = q_i.k_j e^(gam_i - gam_j) (j <= i),
    stored per sub-chunk block (I, J), J <= I; blocks above the diagonal are never written nor read.
    Also the gated operands of the later kernels, so they never reload q/k/gam nor redo the l2norm:
    QG = e^gam (scale q), KG = e^(gam_last - gam) k, W = beta e^gam k (the solve kernel multiplies it by T)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // R
    t0, eos = _chunk_start(CU, CSEQ, COFF, c, C)
    offs_k = tl.arange(0, BK)
    offs_b = tl.arange(0, BC)
    mk = offs_k < DK
    row_qk = DK * (HV // R)
    q_base = Q + hk * DK
    k_base = K + hk * DK
    pc = c.to(tl.int64) * C  # first padded row of this chunk
    for I in tl.static_range(C // BC):
        ri = I * BC + offs_b  # rows of block I inside the chunk
        vi = t0 + ri < eos
        q_i = _qk_rows(q_base, t0 + ri, vi, row_qk, offs_k, DK, scale, L2)
        k_i = _qk_rows(k_base, t0 + ri, vi, row_qk, offs_k, DK, 1.0, L2)
        b_i = tl.load(BETA + (t0 + ri).to(tl.int64) * HV + h, mask=vi, other=0.0).to(tl.float32)
        if HAS_G:
            if GATE_K:
                g_i = _rows(GAM + h * DK, pc + ri, ri < C, HV * DK, offs_k, DK)
                g_last = tl.load(GAM + ((pc + C - 1) * HV + h) * DK + offs_k, mask=mk, other=0.0)
                qg_i = q_i * tl.exp(g_i)
                kg_i = k_i * tl.exp(g_last[None, :] - g_i)
                kb_i = k_i * tl.exp(g_i) * b_i[:, None]
            else:
                g_i = tl.load(GAM + (pc + ri) * HV + h)
                g_last = tl.load(GAM + (pc + C - 1) * HV + h)
                qg_i = q_i * tl.exp(g_i)[:, None]
                kg_i = k_i * tl.exp(g_last - g_i)[:, None]
                kb_i = k_i * (tl.exp(g_i) * b_i)[:, None]
        else:
            qg_i = q_i
            kg_i = k_i
            kb_i = k_i * b_i[:, None]
        rows_k = ((pc + ri) * HV + h)[:, None] * DK + offs_k[None, :]
        tl.store(QG + rows_k, qg_i, mask=mk[None, :])
        tl.store(KG + rows_k, kg_i, mask=mk[None, :])
        tl.store(W + rows_k, kb_i, mask=mk[None, :])
        for J in tl.static_range(I + 1):
            rj = J * BC + offs_b
            vj = t0 + rj < eos
            k_j = _qk_rows(k_base, t0 + rj, vj, row_qk, offs_k, DK, 1.0, L2)
            if J < I:  # off-diagonal: every (i, j) is visible
                if HAS_G:
                    if GATE_K:
                        # reference point gn = gam at block I's first row: gam_i - gn <= 0, gn - gam_j <= 0
                        gn = tl.load(GAM + ((pc + I * BC) * HV + h) * DK + offs_k, mask=mk, other=0.0)
                        g_j = _rows(GAM + h * DK, pc + rj, rj < C, HV * DK, offs_k, DK)
                        kg_j = k_j * tl.exp(gn[None, :] - g_j)
                        e_i = tl.exp(g_i - gn[None, :])
                        aqk = tl.dot(q_i * e_i, tl.trans(kg_j), input_precision=PREC)
                        akk = tl.dot(k_i * e_i, tl.trans(kg_j), input_precision=PREC)
                    else:
                        g_j = tl.load(GAM + (pc + rj) * HV + h)
                        dec = tl.exp(g_i[:, None] - g_j[None, :])
                        aqk = tl.dot(q_i, tl.trans(k_j), input_precision=PREC) * dec
                        akk = tl.dot(k_i, tl.trans(k_j), input_precision=PREC) * dec
                else:
                    aqk = tl.dot(q_i, tl.trans(k_j), input_precision=PREC)
                    akk = tl.dot(k_i, tl.trans(k_j), input_precision=PREC)
            else:  # diagonal block: causal inside it
                lower_eq = offs_b[:, None] >= offs_b[None, :]
                if HAS_G and GATE_K:
                    aqk = tl.zeros([BC, BC], dtype=tl.float32)
                    akk = tl.zeros([BC, BC], dtype=tl.float32)
                    for jj in range(BC):  # column jj of the block, summed over channels
                        kr = _qk_vec(k_base, t0 + I * BC + jj, eos, row_qk, offs_k, DK, 1.0, L2)
                        gr = tl.load(GAM + ((pc + I * BC + jj) * HV + h) * DK + offs_k, mask=mk, other=0.0)
                        # masked (row < jj) exponents become -inf before exp: they are positive
                        e = tl.exp(tl.where(offs_b[:, None] >= jj, g_i - gr[None, :], float("-inf")))
                        col_q = tl.sum(q_i * kr[None, :] * e, 1)
                        col_k = tl.sum(k_i * kr[None, :] * e, 1)
                        aqk = tl.where(offs_b[None, :] == jj, col_q[:, None], aqk)
                        akk = tl.where(offs_b[None, :] == jj, col_k[:, None], akk)
                else:
                    aqk = tl.dot(q_i, tl.trans(k_j), input_precision=PREC)
                    akk = tl.dot(k_i, tl.trans(k_j), input_precision=PREC)
                    if HAS_G:
                        g_j = tl.load(GAM + (pc + rj) * HV + h)
                        dec = tl.exp(tl.where(lower_eq, g_i[:, None] - g_j[None, :], float("-inf")))
                        aqk = aqk * dec
                        akk = akk * dec
                aqk = tl.where(lower_eq, aqk, 0.0)
                akk = tl.where(offs_b[:, None] > offs_b[None, :], akk, 0.0)
            akk = akk * b_i[:, None]
            dst = ((pc + ri) * HV + h)[:, None] * C + rj[None, :]
            tl.store(AKK + dst, akk)
            tl.store(AQK + dst, aqk)


@triton.jit
def chunk_wu_kernel(
    V, BETA, AKK, W, U, CU, CSEQ, COFF,
    HV, DK, DV,
    PREC: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """T = (I + A)^-1 (unit lower triangular) by forward substitution, then W <- T W (W holds beta e^gam K on
    entry, written by the scores kernel; this program reads its whole tile before writing it) and U = T (beta V)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    t0, eos = _chunk_start(CU, CSEQ, COFF, c, C)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    rows = t0 + offs_c
    valid = rows < eos
    pc = c.to(tl.int64) * C
    p = pc + offs_c
    # row i of T: e_i - sum_{j<i} A[i, j] T[j, :]; rows >= i are still identity rows when row i is solved
    tm = (offs_c[:, None] == offs_c[None, :]).to(tl.float32)
    for i in range(1, C):
        a = tl.load(AKK + ((pc + i) * HV + h) * C + offs_c, mask=offs_c < i, other=0.0)
        tm = tl.where(offs_c[:, None] == i, tm - tl.sum(a[:, None] * tm, 0)[None, :], tm)
    w_ptr = W + (p * HV + h)[:, None] * DK + offs_k[None, :]
    kb = tl.load(w_ptr, mask=offs_k[None, :] < DK, other=0.0)
    tl.store(w_ptr, tl.dot(tm, kb, input_precision=PREC), mask=offs_k[None, :] < DK)
    beta = tl.load(BETA + rows.to(tl.int64) * HV + h, mask=valid, other=0.0).to(tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        vb = _rows(V + h * DV, rows, valid, DV * HV, offs_v, DV) * beta[:, None]
        u = tl.dot(tm, vb, input_precision=PREC)
        tl.store(U + (p * HV + h)[:, None] * DV + offs_v[None, :], u, mask=offs_v[None, :] < DV)


@triton.jit
def chunk_state_output_kernel(
    QG, KG, GAM, AQK, W, U, O, S_IN, S_OUT, CU, COFF,
    si_n, si_h, si_k, si_v, so_n, so_h, so_k, so_v,
    HV, DK, DV,
    HAS_G: tl.constexpr, GATE_K: tl.constexpr, HAS_S0: tl.constexpr, STORE_S: tl.constexpr,
    PREC: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Sequential over one sequence's chunks with S [BK, BV] in registers; every operand comes from scratch."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    bos = tl.load(CU + n)
    eos = tl.load(CU + n + 1)
    c0 = tl.load(COFF + n)
    c1 = tl.load(COFF + n + 1)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    mask_s = mk[:, None] & mv[None, :]
    n64 = n.to(tl.int64)
    if HAS_S0:
        s = tl.load(S_IN + n64 * si_n + h * si_h + offs_k[:, None].to(tl.int64) * si_k
                    + offs_v[None, :].to(tl.int64) * si_v, mask=mask_s, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    causal = offs_c[None, :] <= offs_c[:, None]
    c0_64 = c0.to(tl.int64)
    for j in range(0, c1 - c0):
        rows = bos + j * C + offs_c
        pc = (c0_64 + j) * C
        p = pc + offs_c
        rows_k = (p * HV + h)[:, None] * DK + offs_k[None, :]
        u = tl.load(U + (p * HV + h)[:, None] * DV + offs_v[None, :], mask=mv[None, :], other=0.0)
        w = tl.load(W + rows_k, mask=mk[None, :], other=0.0)
        v_new = u - tl.dot(w, s, input_precision=PREC)  # value errors after reading the carried state
        qg = tl.load(QG + rows_k, mask=mk[None, :], other=0.0)
        aqk = tl.load(AQK + (p * HV + h)[:, None] * C + offs_c[None, :], mask=causal, other=0.0)
        o = tl.dot(qg, s, input_precision=PREC) + tl.dot(aqk, v_new, input_precision=PREC)
        tl.store(O + rows[:, None].to(tl.int64) * (DV * HV) + h * DV + offs_v[None, :], o.to(O.dtype.element_ty),
                 mask=(rows < eos)[:, None] & mv[None, :])
        if HAS_G:
            if GATE_K:
                s = s * tl.exp(tl.load(GAM + ((pc + C - 1) * HV + h) * DK + offs_k, mask=mk, other=0.0))[:, None]
            else:
                s = s * tl.exp(tl.load(GAM + (pc + C - 1) * HV + h))
        kg = tl.load(KG + rows_k, mask=mk[None, :], other=0.0)
        s = s + tl.dot(tl.trans(kg), v_new, input_precision=PREC)
    if STORE_S:
        tl.store(S_OUT + n64 * so_n + h * so_h + offs_k[:, None].to(tl.int64) * so_k
                 + offs_v[None, :].to(tl.int64) * so_v, s, mask=mask_s)


# ------------------------------------------------------------------ host side

def _tile(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _block_v(dv: int, block_v: int | None) -> int:
    if block_v is not None:
        if block_v < 16 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
        return block_v
    # compiled: 32-wide tiles keep the [dk, BV] fp32 state in registers and give Hv * dv / 32 programs per
    # sequence; the interpreter runs one numpy op per tile op, so one wide tile is faster there
    return _tile(dv) if interpreting() else min(_tile(dv), 32)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, initial_state: Tensor | None,
              cu_seqlens: Tensor | None) -> int:
    n = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state)):
        if t is None:
            continue
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
        if t.device != v.device:
            raise ValueError(f"{name} is on {t.device} but v is on {v.device}: all inputs must share a device")
    if cu_seqlens is not None:
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    return n


def _prep(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, cu_seqlens: Tensor | None,
          n: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Contiguous inputs and the int32 sequence offsets (dense batch b = rows [b T, (b + 1) T))."""
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    B, T = q.shape[:2]
    if cu_seqlens is None:
        cu = torch.arange(0, (n + 1) * T, T, dtype=torch.int32, device=v.device) if T > 0 else \
            torch.zeros(n + 1, dtype=torch.int32, device=v.device)
    else:
        cu = cu_seqlens.to(device=v.device, dtype=torch.int32)
    return q, k, v, g, beta, cu


def _state_strides(s: Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if s is None else tuple(s.stride())  # type: ignore[return-value]


def _launch_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, o: Tensor, cu: Tensor,
                      s_in: Tensor | None, s_out: Tensor | None, idx: Tensor | None, scale: float, l2: bool,
                      n: int, block_v: int | None) -> None:
    Hk, dk = q.shape[-2:]
    Hv, dv = v.shape[-2:]
    bv = _block_v(dv, block_v)
    grid = (n, Hv, triton.cdiv(dv, bv))
    if n == 0 or Hv == 0 or dv == 0:
        return
    dummy = cu
    delta_rule_recurrent_kernel[grid](
        q, k, v, g if g is not None else dummy, beta, o,
        s_in if s_in is not None else dummy, s_out if s_out is not None else dummy, cu,
        idx if idx is not None else dummy,
        *_state_strides(s_in), *_state_strides(s_out),
        Hv, Hv // Hk, dk, dv, float(scale),
        HAS_G=g is not None, GATE_K=g is not None and g.dim() == v.dim(), L2=l2, HAS_S0=s_in is not None,
        STORE_S=s_out is not None, HAS_IDX=idx is not None, BK=_tile(dk), BV=bv, num_warps=4 if bv <= 32 else 8,
    )


def _recurrent_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *, scale: float | None,
                   initial_state: Tensor | None, output_final_state: bool, use_qk_l2norm: bool,
                   cu_seqlens: Tensor | None, block_v: int | None = None) -> tuple[Tensor, Tensor | None]:
    n = _validate(q, k, v, g, beta, initial_state, cu_seqlens)
    if v.dtype == torch.float64:  # an oracle dtype: run the oracle
        return delta_rule_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                                    cu_seqlens=cu_seqlens)
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    scale = dk ** -0.5 if scale is None else scale
    q, k, v, g, beta, cu = _prep(q, k, v, g, beta, cu_seqlens, n)
    o = alloc((B, T, Hv, dv), v.dtype, v.device)
    final = alloc((n, Hv, dk, dv), torch.float32, v.device) if output_final_state else None
    _launch_recurrent(q, k, v, g, beta, o, cu, initial_state, final, None, scale, use_qk_l2norm, n, block_v)
    return o, final


def _chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *, scale: float | None,
               initial_state: Tensor | None, output_final_state: bool, use_qk_l2norm: bool,
               cu_seqlens: Tensor | None, chunk_size: int = 64, block_v: int | None = None) -> tuple[Tensor, Tensor | None]:
    n = _validate(q, k, v, g, beta, initial_state, cu_seqlens)
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"chunk_size must be 16, 32, 64 or 128, got {chunk_size}")
    if v.dtype == torch.float64:
        return delta_rule_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                                    cu_seqlens=cu_seqlens)
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    C = chunk_size
    scale = dk ** -0.5 if scale is None else scale
    q, k, v, g, beta, cu = _prep(q, k, v, g, beta, cu_seqlens, n)
    dev = v.device
    o = alloc((B, T, Hv, dv), v.dtype, dev)
    final = alloc((n, Hv, dk, dv), torch.float32, dev) if output_final_state else None
    if n == 0 or Hv == 0 or dv == 0:
        return o, final
    # chunk bookkeeping on the host (one sync for cu_seqlens): global chunk c belongs to sequence cseq[c]
    lens = (cu[1:] - cu[:-1]).cpu().tolist()
    nch = [-(-L // C) for L in lens]
    coff = [0]
    for x in nch:
        coff.append(coff[-1] + x)
    total = coff[-1]
    cseq = torch.tensor([i for i, x in enumerate(nch) for _ in range(x)] or [0], dtype=torch.int32, device=dev)
    coff_t = torch.tensor(coff, dtype=torch.int32, device=dev)
    bk, bdv, bv = _tile(dk), _tile(dv), _block_v(dv, block_v)
    has_g, gate_k = g is not None, g is not None and g.dim() == 4
    prec = dot_precision(v.dtype)
    # Compile-checked for sm_90 only (no GPU measured yet): 8 warps keep kernels 1-2 at dk = C = 128 / 64 from
    # spilling; the sequential kernel spills ~1 KB either way with tf32 dots and gets the 4-warp default.
    warps = 8 if bk >= 128 or C >= 64 else 4
    f32 = torch.float32
    NP = total * C
    if total > 0:
        gam = alloc((NP, Hv, dk) if gate_k else (NP, Hv), f32, dev) if has_g else cu
        akk = alloc((NP, Hv, C), f32, dev)
        aqk = alloc((NP, Hv, C), f32, dev)
        w = alloc((NP, Hv, dk), f32, dev)
        u = alloc((NP, Hv, dv), f32, dev)
        qg = alloc((NP, Hv, dk), f32, dev)
        kg = alloc((NP, Hv, dk), f32, dev)
        if has_g:
            chunk_cumsum_kernel[(total, Hv)](g, gam, cu, cseq, coff_t, Hv, dk, GATE_K=gate_k, C=C, BK=bk)
        chunk_scores_kernel[(total, Hv)](
            q, k, beta, gam, akk, aqk, qg, kg, w, cu, cseq, coff_t, Hv, Hv // Hk, dk, float(scale),
            HAS_G=has_g, GATE_K=gate_k, L2=use_qk_l2norm, PREC=prec, C=C, BC=SUB, BK=bk, num_warps=warps,
            num_stages=1,
        )
        chunk_wu_kernel[(total, Hv)](
            v, beta, akk, w, u, cu, cseq, coff_t, Hv, dk, dv,
            PREC=prec, C=C, BK=bk, BV=bdv if interpreting() else min(bdv, 64), num_warps=warps, num_stages=1,
        )
    else:  # every sequence is empty: the state kernel only copies initial -> final
        gam = akk = aqk = w = u = qg = kg = cu
    chunk_state_output_kernel[(n, Hv, triton.cdiv(dv, bv))](
        qg, kg, gam, aqk, w, u, o, initial_state if initial_state is not None else cu,
        final if final is not None else cu, cu, coff_t,
        *_state_strides(initial_state), *_state_strides(final), Hv, dk, dv,
        HAS_G=has_g, GATE_K=gate_k, HAS_S0=initial_state is not None,
        STORE_S=final is not None, PREC=prec, C=C, BK=bk, BV=bv, num_warps=4, num_stages=1,
    )
    return o, final


def _torch_forward():  # type: ignore[no-untyped-def]
    """The differentiable PyTorch form the backward recomputes through: chunk_delta_rule (same contract), or the
    token-loop reference if that module is unavailable."""
    try:
        from attnzoo.ops.delta_rule.chunk import chunk_delta_rule_torch
        return chunk_delta_rule_torch
    except ImportError:
        return delta_rule_reference


class _ReferenceBackward(torch.autograd.Function):
    """Forward: a Triton kernel. Backward: recompute the forward in PyTorch (chunk_delta_rule, autograd through
    its ops) and differentiate that: honest, memory-hungry and slower than a Triton backward would be."""

    @staticmethod
    def forward(ctx, fwd, kw, q, k, v, g, beta, initial_state):  # type: ignore[no-untyped-def, override]
        o, final = fwd(q, k, v, g, beta, initial_state=initial_state, **kw)
        ctx.kw = {key: val for key, val in kw.items() if key in ("scale", "output_final_state", "use_qk_l2norm",
                                                                  "cu_seqlens")}
        ctx.has_final = final is not None
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        if final is None:  # autograd Functions return tensors: an empty placeholder the caller drops
            final = torch.zeros(0, device=v.device)
            ctx.mark_non_differentiable(final)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):  # type: ignore[no-untyped-def, override]
        saved = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip(saved, ctx.needs_input_grad[2:])]
            o, final = _torch_forward()(*leaves[:5], initial_state=leaves[5], **ctx.kw)
            outs, grads = [o], [do]
            if ctx.has_final and dfinal is not None:
                outs.append(final)
                grads.append(dfinal)
            want = [t for t in leaves if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(outs, want, grads, allow_unused=True)) if want else iter(())
        return (None, None, *[next(got) if t is not None and t.requires_grad else None for t in leaves])


def _dispatch(fwd, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, kw: dict,  # type: ignore[no-untyped-def]
              initial_state: Tensor | None) -> tuple[Tensor, Tensor | None]:
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state))
    if not needs_grad:
        return fwd(q, k, v, g, beta, initial_state=initial_state, **kw)
    o, final = _ReferenceBackward.apply(fwd, kw, q, k, v, g, beta, initial_state)
    return o, (final if kw["output_final_state"] else None)


# ------------------------------------------------------------------ public API

def fused_recurrent_delta_rule_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = True, use_qk_l2norm: bool = False,
    cu_seqlens: Tensor | None = None, block_v: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`delta_rule_reference`'s contract, token by token in Triton: one program per (sequence, value head,
    dv block of `block_v` columns, a power of two >= 16; default 32 compiled). -> (o [B, T, Hv, dv] in v's
    dtype, final state [N, Hv, dk, dv] float32 or None). Backward: see the module docstring."""
    kw = dict(scale=scale, output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
              cu_seqlens=cu_seqlens, block_v=block_v)
    return _dispatch(_recurrent_fwd, q, k, v, g, beta, kw, initial_state)


def chunk_delta_rule_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = True, use_qk_l2norm: bool = False,
    cu_seqlens: Tensor | None = None, chunk_size: int = 64, block_v: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`delta_rule_reference`'s contract by the chunked WY algorithm (chunk_size 16, 32, 64 or 128; chunks never
    straddle sequences). Gates are log-decays (g <= 0): that keeps every exponent the kernels take <= 0.
    Scratch while it runs: ~(3 dk + dv + 2 C) fp32 values per (token, value head). Backward: see the module
    docstring."""
    kw = dict(scale=scale, output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
              cu_seqlens=cu_seqlens, chunk_size=chunk_size, block_v=block_v)
    return _dispatch(_chunk_fwd, q, k, v, g, beta, kw, initial_state)


def delta_rule_step_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, state: Tensor, *,
    scale: float | None = None, use_qk_l2norm: bool = False, state_indices: Tensor | None = None,
    block_v: int | None = None,
) -> Tensor:
    """One decode token per sequence; updates `state` in place and returns o [B, Hv, dv] in v's dtype.

    q, k [B, Hk, dk]; v [B, Hv, dv]; g None, [B, Hv] or [B, Hv, dk]; beta [B, Hv].
    state: float32 [B, Hv, dk, dv], or with state_indices (int [B]) a pool [slots, Hv, dk, dv] whose row
    state_indices[b] is sequence b's state, read and written in place (no gather/scatter). The indices must be
    distinct and < slots (checked when they are on the CPU); a negative index marks a padding entry: its state
    is not touched and its output is 0.
    Any strides are fine for `state` (it is never copied). No autograd."""
    check_step_inputs(q, k, v, g, beta)
    B, Hk, dk = q.shape
    Hv, dv = v.shape[1:]
    if state.dtype != torch.float32:
        raise TypeError(f"state must be float32 (it is updated in place), got {state.dtype}")
    if state_indices is None:
        if state.shape != (B, Hv, dk, dv):
            raise ValueError(f"state must be [{B}, {Hv}, {dk}, {dv}], got {tuple(state.shape)}")
    else:
        if state.dim() != 4 or state.shape[1:] != (Hv, dk, dv):
            raise ValueError(f"state must be a pool [slots, {Hv}, {dk}, {dv}], got {tuple(state.shape)}")
        if state_indices.shape != (B,) or state_indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"state_indices must be an int32/int64 tensor of shape [{B}], got "
                             f"{tuple(state_indices.shape)} {state_indices.dtype}")
        # bounds are checked for host indices only: reading device ones would sync every decode step
        if state_indices.device.type == "cpu" and state_indices.numel() and int(state_indices.max()) >= state.shape[0]:
            raise ValueError(f"state_indices must be < {state.shape[0]} (the pool's slots)")
        state_indices = state_indices.to(device=v.device, dtype=torch.int32)
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("state", state)):
        if t is not None and t.device != v.device:
            raise ValueError(f"{name} is on {t.device} but v is on {v.device}: all inputs must share a device")
        if t is not None and t.dtype not in _FLOATS[:3]:
            raise TypeError(f"{name} must be float16/bfloat16/float32, got {t.dtype}")
    scale = dk ** -0.5 if scale is None else scale
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    g = None if g is None else g.contiguous()
    o = alloc((B, Hv, dv), v.dtype, v.device)
    cu = torch.arange(B + 1, dtype=torch.int32, device=v.device)
    _launch_recurrent(q, k, v, g, beta, o, cu, state, state, state_indices, scale, use_qk_l2norm, B, block_v)
    return o


__all__ = ["chunk_delta_rule_triton", "delta_rule_step_triton", "fused_recurrent_delta_rule_triton"]
