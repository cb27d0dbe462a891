"""The gated delta rule in chunks of C tokens (WY / UT form, docs/mechanisms/delta_rule.md §3): prefill, training.

Per chunk (positions i, j < C, gam = cumsum of the log-decay inside the chunk, S0 the state entering it):
    A[i,j]   = beta_i sum_c k_i[c] k_j[c] e^(gam_i[c] - gam_j[c])   (j < i)
    Aqk[i,j] =        sum_c q_i[c] k_j[c] e^(gam_i[c] - gam_j[c])   (j <= i)
    U = X V,  W = X (e^gam K),  X = (I + A)^-1 diag(beta)           one batched triangular solve
    V_new    = U - W S0;   O = (e^gam Q) S0 + Aqk V_new
    S_next   = e^gam_last S0 + (e^(gam_last - gam) K)^T V_new
Everything but the last two lines is batched over chunks (cache-sized groups of them); only the state is
passed chunk to chunk.

Sequences (the batch rows, or the cu_seqlens spans) are each padded to whole chunks (beta = 0, g = 0 pads
leave the state alone) and laid out "step-major": step s holds chunk s of every sequence still running,
longest first, so the state batch of step s is a prefix and its chunks a contiguous run. Varlen costs
no padding to the longest sequence and the sequential loop is max_i ceil(T_i / C) steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnzoo.ops.delta_rule.reference import setup_inputs

GRAM_BASE = 4          # per-channel gate: blocks this small get exp(gam_i - gam_j) per diagonal, explicitly
GROUP_ELEMS = 1 << 20  # intra-chunk work is batched over groups of chunks of about this many elements per
                       # [C, d] tensor: 4 MiB fp32 stays in cache (8k tokens: 2^24 was 1.5x slower on CPU)


@dataclass(frozen=True)
class Layout:
    """Sequences cut into chunks of C tokens, in step-major order (step s: chunk s of every sequence that
    has one, longest sequences first)."""
    gather: Tensor                   # [n_chunks, C] flat token of each chunk row; a pad repeats its
                                     # sequence's last token (finite if the sequence is; never another's)
    valid: Tensor | None             # [n_chunks, C] False on pads; None when there are none
    token_chunk: Tensor              # [n_tokens] chunk of each flat token
    token_pos: Tensor                # [n_tokens] its row in the chunk
    steps: list[tuple[int, int]]     # per step: (first chunk, number of active sequences)
    order: Tensor                    # [N] sequence of each state row (longest first)
    dense: int | None = None         # B when the tokens are B equal rows of whole chunks: chunks are strided
                                     # views then, no gather needed (cheaper copies)

    def chunks(self, x: Tensor, c0: int, c1: int) -> Tensor:
        """x [n_tokens, H, ...] -> chunks [c0, c1) as [c1 - c0, H, C, ...], one copy."""
        if self.dense:
            B, C = self.dense, self.gather.shape[1]
            rows = x.view(B, -1, C, *x.shape[1:])[:, c0 // B:c1 // B]    # [B, steps, C, H, ...]
            return rows.transpose(0, 1).transpose(2, 3).reshape(c1 - c0, x.shape[1], C, *x.shape[2:])
        heads = torch.arange(x.shape[1], device=x.device)
        return x[self.gather[c0:c1, None, :], heads[None, :, None]]

    def write(self, out: Tensor, y: Tensor, first: int, a: int) -> None:
        """Copy y [a, H, C, ...], chunks [first, first + a), into their tokens' rows of out [n_tokens, H, ...]."""
        C = self.gather.shape[1]
        if self.dense:
            out.view(self.dense, -1, C, *out.shape[1:])[:, first // self.dense].copy_(y.transpose(1, 2))
            return
        rows, idx = y.transpose(1, 2).flatten(0, 1), self.gather[first:first + a].flatten()
        if self.valid is not None:  # pads repeat a real token's index: skip them
            keep = self.valid[first:first + a].flatten()
            rows, idx = rows[keep], idx[keep]
        out.index_copy_(0, idx, rows)

    def tokens(self, y: Tensor) -> Tensor:
        """y [n_chunks, H, C, ...] -> [n_tokens, H, ...]."""
        if self.dense:
            y = y.unflatten(0, (-1, self.dense)).transpose(0, 1).transpose(2, 3)    # [B, steps, C, H, ...]
            return y.reshape(-1, *y.shape[3:])
        heads = torch.arange(y.shape[1], device=y.device)
        return y[self.token_chunk[:, None], heads[None, :], self.token_pos[:, None]]


def output_buffer(n_tokens: int, H: int, d: int, like: Tensor) -> Tensor:
    """The inference path's output, uninitialised: every token's row is written exactly once (the tests
    swap in a NaN-filled buffer to prove it)."""
    return like.new_empty(n_tokens, H, d)


def needs_grad(*xs: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def make_layout(lengths: list[int], starts: list[int], chunk: int, device: torch.device) -> Layout:
    n_tokens = sum(lengths)
    L = torch.tensor(lengths, dtype=torch.long)
    n_chunks = -(-L // chunk)
    order = torch.sort(n_chunks, descending=True, stable=True).indices
    ns = n_chunks[order]
    active = torch.arange(int(ns[0]) if len(lengths) else 0)[:, None] < ns[None, :]  # [steps, N]
    step, rank = active.nonzero(as_tuple=True)             # row-major: step-major, longest first
    seq = order[rank]
    offset = (step * chunk)[:, None] + torch.arange(chunk)   # [n_chunks, C] offset in the sequence
    valid = offset < L[seq][:, None]
    start = torch.tensor(starts, dtype=torch.long)[seq][:, None]
    gather = start + torch.minimum(offset, L[seq][:, None] - 1)
    flat = valid.flatten().nonzero().squeeze(1)              # chunk rows holding real tokens
    token_chunk = torch.empty(n_tokens, dtype=torch.long)
    token_pos = torch.empty(n_tokens, dtype=torch.long)
    token_chunk[gather.flatten()[flat]] = flat // chunk
    token_pos[gather.flatten()[flat]] = flat % chunk
    counts = active.sum(1).tolist()
    firsts = [0]
    for c in counts[:-1]:
        firsts.append(firsts[-1] + c)
    full = bool(valid.all())
    rows = len(set(lengths)) == 1 and starts == [i * lengths[0] for i in range(len(lengths))]
    dense = len(lengths) if full and rows else None
    return Layout(gather.to(device), None if full else valid.to(device), token_chunk.to(device),
                  token_pos.to(device), list(zip(firsts, counts)), order.to(device), dense)


def sequences(B: int, T: int, cu_seqlens: Tensor | None) -> tuple[list[int], list[int]]:
    """(lengths, starts) of the sequences in the flat [B * T] token axis."""
    if cu_seqlens is None:
        return [T] * B, [b * T for b in range(B)]
    cu = cu_seqlens.tolist()
    if any(e < s for s, e in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    return [e - s for s, e in zip(cu, cu[1:])], cu[:-1]


def _rep(x: Tensor, r: int) -> Tensor:
    """Key heads -> value heads (dim 1): value head h reads key head h // r."""
    return x if r == 1 else x.repeat_interleave(r, 1)


def decayed_gram(xs: list[Tensor], y: Tensor, gam: Tensor) -> list[Tensor]:
    """For each x in xs: M[.., i, j] = sum_c x[.., i, c] y[.., j, c] exp(gam[.., i, c] - gam[.., j, c]) for
    j <= i, else 0 (x, y, gam [.., C, d]; gam non-increasing along C: a cumsum of log-decays <= 0).

    Never forms e^-gam (it overflows over a chunk). Halve the diagonal blocks level by level: the lower-left
    quarter of a block factors through ref = gam at the end of its first half as
    (x_i e^(gam_i - ref)) . (y_j e^(ref - gam_j)), both factors <= 1, one matmul for all blocks of a level;
    blocks of GRAM_BASE go diagonal by diagonal with e^(gam_i - gam_{i-d}), d >= 0."""
    *batch, C, _ = y.shape
    Ms = [y.new_zeros(*batch, C, C) for _ in xs]
    n = C
    while n > GRAM_BASE and n % 2 == 0:
        h, P = n // 2, C // n
        g6 = gam.unflatten(-2, (P, 2, h))                           # [.., P, 2, h, d]
        ref = g6[..., :, 0, h - 1:, :]                                # [.., P, 1, d]: end of first half
        rows = (g6[..., :, 1, :, :] - ref).exp()
        yf = y.unflatten(-2, (P, 2, h))[..., :, 0, :, :] * (ref - g6[..., :, 0, :, :]).exp()
        for x, M in zip(xs, Ms):
            low = (x.unflatten(-2, (P, 2, h))[..., :, 1, :, :] * rows) @ yf.mT       # [.., P, h, h]
            M.view(*batch, P, 2, h, P, 2, h)[..., :, 1, :, :, 0, :].diagonal(0, -4, -2).copy_(low.movedim(-3, -1))
        n = h
    P = C // n
    g5, y5 = gam.unflatten(-2, (P, n)), y.unflatten(-2, (P, n))
    for d in range(n):  # d-th sub-diagonal of every n-block
        ye = y5[..., :n - d, :] * (g5[..., d:, :] - g5[..., :n - d, :]).exp() if d else y5
        for x, M in zip(xs, Ms):
            vals = (x.unflatten(-2, (P, n))[..., d:, :] * ye).sum(-1)               # [.., P, n - d]
            M.view(*batch, P, n, P, n).diagonal(0, -4, -2).diagonal(-d, -3, -2).copy_(vals)
    return Ms


def intra_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, r: int) -> tuple[Tensor, ...]:
    """Batched per-chunk work. q, k [n, Hk, C, dk] (q scaled); v [n, Hv, C, dv]; g [n, Hv, C] or
    [n, Hv, C, dk]; beta [n, Hv, C]. Returns, per value head: U [n, Hv, C, dv], W and e^gam Q
    [n, Hv, C, dk], Aqk [n, Hv, C, C], e^(gam_last - gam) K [n, Hv, C, dk], and the chunk's decay
    e^gam_last (broadcastable to the state [n, Hv, dk, dv])."""
    n, Hk, C, dk = q.shape
    if g.dim() == 3:  # scalar per head: the decay factors out of q.k as a [C, C] mask
        def per_key(x: Tensor) -> Tensor:  # [n, Hv, ...] -> [n, Hk, r, ...]: value heads by key head
            return x.unflatten(1, (Hk, r))
        gam = g.cumsum(-1)
        upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
        decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(upper, float("-inf")).exp()
        # the Gram matrices once per key head, broadcast to its r value heads by the multiply
        aqk = ((q @ k.mT)[:, :, None] * per_key(decay)).flatten(1, 2)
        a = ((k @ k.mT)[:, :, None] * per_key(decay * beta[..., :, None])).flatten(1, 2)
        eg = per_key(gam.exp())[..., None]
        q5, k5 = q[:, :, None], k[:, :, None]
        qg, keg = (q5 * eg).flatten(1, 2), (k5 * eg).flatten(1, 2)
        kd = (k5 * per_key((gam[..., -1:] - gam).exp())[..., None]).flatten(1, 2)
        last = gam[..., -1].exp()[..., None, None]
    else:             # per key channel: decay-weighted inner products, computed safely
        gam = g.cumsum(-2)
        qv, kv = _rep(q, r), _rep(k, r)
        aqk, a = decayed_gram([qv, kv], kv, gam)
        a = a * beta[..., :, None]
        eg = gam.exp()
        qg, keg = qv * eg, kv * eg
        kd = kv * (gam[..., -1:, :] - gam).exp()
        last = gam[..., -1, :].exp()[..., None]
    # (I + A)^-1 diag(beta): A's diagonal is ignored (unitriangular) and gets no gradient
    eye = torch.eye(C, dtype=a.dtype, device=a.device).expand_as(a)
    x = torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True) * beta[..., None, :]
    return x @ v, x @ keg, qg, aqk, kd, last


def chunk_delta_rule_torch(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *,
                     scale: float | None = None, initial_state: Tensor | None = None,
                     output_final_state: bool = True, use_qk_l2norm: bool = False,
                     cu_seqlens: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Same contract as delta_rule_reference: q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g [B, T, Hv] or
    [B, T, Hv, dk] (log-decay <= 0) or None; beta [B, T, Hv]; initial_state [N, Hv, dk, dv]. Returns
    o [B, T, Hv, dv] in v's dtype and the final state [N, Hv, dk, dv] (float32; float64 for float64
    inputs). Differentiable."""
    n, wide, scale = setup_inputs(q, k, v, g, beta, initial_state, cu_seqlens, scale)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, Hk, dk = q.shape
    Hv, dv = v.shape[2:]
    r, C = Hv // Hk, chunk_size
    out_dtype = v.dtype
    # casts, scale and l2norm happen per group of chunks: no full-length temporaries
    q, k, v, beta = (t.flatten(0, 1) for t in (q, k, v, beta))
    g = beta.new_zeros(B * T, Hv) if g is None else g.flatten(0, 1)
    lay = make_layout(*sequences(B, T, cu_seqlens), C, q.device)
    S = (v.new_zeros(n, Hv, dk, dv, dtype=wide) if initial_state is None
         else initial_state.to(wide).index_select(0, lay.order))
    per_group = max(1, GROUP_ELEMS // (Hv * C * max(dk, dv)))
    # autograd: collect the chunk outputs and reorder once; inference: write each step into the output
    grad = needs_grad(q, k, v, g, beta, S)
    out = None if grad else output_buffer(B * T, Hv, dv, S)
    outs, i = [], 0
    while i < len(lay.steps):  # groups of whole steps, about per_group chunks each
        j, c0 = i + 1, lay.steps[i][0]
        while j < len(lay.steps) and lay.steps[j][0] + lay.steps[j][1] - c0 <= per_group:
            j += 1
        c1 = lay.steps[j - 1][0] + lay.steps[j - 1][1]
        qc, kc, vc, gc, bc = (lay.chunks(x, c0, c1).to(wide) for x in (q, k, v, g, beta))
        qc, kc = prepare_qk(qc, kc, scale, use_qk_l2norm)
        if lay.valid is not None:  # pads: beta = 0 (no write), g = 0 (no decay)
            keep = lay.valid[c0:c1, None, :]
            gc, bc = gc * (keep if gc.dim() == 3 else keep[..., None]), bc * keep
        u, w, qg, aqk, kd, last = intra_chunk(qc, kc, vc, gc, bc, r)
        for first, a in lay.steps[i:j]:
            c = slice(first - c0, first - c0 + a)
            Sa = S[:a]
            S0 = Sa.flatten(0, 1)                                                      # [a Hv, dk, dv]
            vn = torch.baddbmm(u[c].flatten(0, 1), w[c].flatten(0, 1), S0, alpha=-1)  # U - W S0
            o = torch.baddbmm(qg[c].flatten(0, 1) @ S0, aqk[c].flatten(0, 1), vn)
            if grad:
                outs.append(o)
            else:
                lay.write(out, o.unflatten(0, (a, Hv)), first, a)
            Sn = torch.baddbmm((last[c] * Sa).flatten(0, 1), kd[c].flatten(0, 1).mT, vn).unflatten(0, (a, Hv))
            S = Sn if a == n else torch.cat([Sn, S[a:]])
        i = j
    if grad:
        out = lay.tokens(torch.cat(outs).unflatten(0, (-1, Hv))) if outs else S.new_zeros(0, Hv, dv)
    final = S.index_select(0, torch.argsort(lay.order)) if output_final_state else None
    return out.reshape(B, T, Hv, dv).to(out_dtype), final


def prepare_qk(q: Tensor, k: Tensor, scale: float, use_qk_l2norm: bool) -> tuple[Tensor, Tensor]:
    """Optional l2norm (eps inside the sqrt, as the reference's l2norm) with the scale folded into q's."""
    if not use_qk_l2norm:
        return q * scale, k
    inv = [torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() + 1e-6) for x in (q, k)]
    return q * (inv[0] * scale), k * inv[1]
