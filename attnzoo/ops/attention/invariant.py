"""Batch-invariant softmax attention: each query's output has the same bits whether it is computed in a
prefill chunk of any length, as a decode row among any others, over a paged or a contiguous cache.

How (the reduction order is a property of the query alone):
- keys are cut into blocks of KEY_BLOCK keys aligned to absolute key positions (block j = keys
  [j*B, (j+1)*B)), so a query meets the same blocks whatever its batch;
- scores and the value products are computed per item "one query token's G heads x one key block"
  with `bmm` calls of fixed item shapes [G, d] x [d, B] and [G, B] x [B, dv] and fixed operand layouts
  (the BLAS computes an item the same way for any batch count: checked by
  `ops.batch_invariant.check_gemm_invariance` and the tests);
- the softmax max is exact (order-free); exp(s - max) is elementwise; the per-block sums are
  reductions over a fixed B; the blocks are combined by a pairwise sum over a power-of-two count
  padded with zero blocks, which gives the same bits for any amount of padding (x + 0 == x), so keys a
  query cannot see (future tokens of its chunk, other rows' longer contexts) never change its result.
Only the sign of an output element that is exactly zero can differ (invisible keys contribute +0 in one
form and -0 in the other), which no later computation can observe.

Compute is in float32 (float64 for float64 inputs); the output is cast back to q's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.ops.attention.reference import Problem, attention_form, compute_dtype, visible

KEY_BLOCK = 128
_SCORE_BUDGET = 1 << 24      # score elements materialised per query chunk (64 MiB in float32)
_NEG_INF = float("-inf")


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """bmm through its `out=` overload, which `batch_invariant()` leaves alone: the items here already have
    fixed shapes, and tiling G rows up to ROWS would only waste work."""
    return torch.bmm(a, b, out=a.new_empty(a.shape[0], a.shape[1], b.shape[2]))


def tree_sum(x: Tensor, dim: int) -> Tensor:
    """Pairwise sum over `dim` (element i with i + n/2), zero-padded to a power of two. Trailing zero
    blocks leave the result's bits unchanged, so a row's sum does not depend on the batch's longest row."""
    n = x.shape[dim]
    width = 1 << max(0, (n - 1).bit_length())
    if width != n:
        pad = list(x.shape)
        pad[dim] = width - n
        x = torch.cat([x, x.new_zeros(pad)], dim)
    while x.shape[dim] > 1:
        half = x.shape[dim] // 2
        x = x.narrow(dim, 0, half) + x.narrow(dim, half, half)
    return x.squeeze(dim)


def _pad_dim(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the last dim to a multiple (items then start 64-byte aligned; zeros add nothing)."""
    extra = -x.shape[-1] % multiple
    return x if extra == 0 else torch.nn.functional.pad(x, (0, extra))


def _finish(s: Tensor, pv: "callable", sinks: Tensor | None, blk_dim: int, G: int) -> tuple[Tensor, Tensor]:
    """s: masked, scaled scores with the block dim at `blk_dim` and [.., G, B] last; pv(p) -> per-block
    outputs [.., G, dv] in the same layout. Returns (out [.., G, dv] without the block dim, lse [.., G])."""
    m = s.amax(dim=(blk_dim, -1))
    if sinks is not None:
        m = torch.maximum(m, sinks)
    m_safe = m.masked_fill(m == _NEG_INF, 0.0)        # a row that sees nothing: exp(-inf - 0) = 0, not nan
    p = torch.exp(s - m_safe.unsqueeze(blk_dim).unsqueeze(-1))
    l = tree_sum(p.sum(-1), blk_dim)
    o = tree_sum(pv(p), blk_dim)
    if sinks is not None:                              # the sink joins the denominator and carries no value
        l = l + torch.exp(sinks - m_safe)
    out = o / l.clamp(min=torch.finfo(l.dtype).tiny).unsqueeze(-1)
    return out, m_safe + torch.log(l)


def attend_rows(q: Tensor, k: Tensor, v: Tensor, seen: Tensor, scale: float, sinks: Tensor | None
                ) -> tuple[Tensor, Tensor]:
    """Decode form: each row has its own keys. q [R, Hkv, G, d], k [R, Hkv, nb*B, d], v [R, Hkv, nb*B, dv]
    (compute dtype, block-aligned: slot 0 of each row is a multiple of B in absolute key position),
    seen [R, nb*B] bool: the keys the row's query sees. Returns (out [R, Hkv, G, dv], lse [R, Hkv, G])."""
    R, Hkv, G, d = q.shape
    L, dv, B = k.shape[2], v.shape[-1], KEY_BLOCK
    nb = L // B
    q, k, v = _pad_dim(q, 16), _pad_dim(k, 16), _pad_dim(v, 16)
    v = v.masked_fill(~seen.view(R, 1, L, 1), 0.0)    # unseen slots may hold stale pages: never 0 * nan
    qi = q.unsqueeze(2).expand(R, Hkv, nb, G, q.shape[-1]).reshape(-1, G, q.shape[-1])
    s = _bmm(qi, k.reshape(-1, B, k.shape[-1]).transpose(1, 2)).view(R, Hkv, nb, G, B) * scale
    s = s.masked_fill(~seen.view(R, 1, nb, 1, B), _NEG_INF)
    sk = None if sinks is None else sinks.view(1, Hkv, G)
    vi = v.reshape(-1, B, v.shape[-1])
    out, lse = _finish(s, lambda p: _bmm(p.reshape(-1, G, B), vi).view(R, Hkv, nb, G, -1), sk, 2, G)
    return out[..., :dv], lse


def attend_shared(q: Tensor, k: Tensor, v: Tensor, seen: Tensor, scale: float, sinks: Tensor | None
                  ) -> tuple[Tensor, Tensor]:
    """Prefill form: T queries of one sequence share its keys. q [T, Hkv, G, d], k [Hkv, nb*B, d],
    v [Hkv, nb*B, dv] (compute dtype, block-aligned), seen [T, nb*B] bool. Same bits per query as
    `attend_rows` given that query's keys; only the (block, query band) pairs a query can see are computed.
    Returns (out [T, Hkv, G, dv], lse [T, Hkv, G])."""
    T, Hkv, G, _ = q.shape
    dv = v.shape[-1]
    q, k, v = _pad_dim(q, 16), _pad_dim(k, 16), _pad_dim(v, 16)
    chunk = max(1, _SCORE_BUDGET // max(1, Hkv * G * k.shape[1]))   # bounds the scores held at once
    res = [_shared_chunk(q[t:t + chunk], k, v, seen[t:t + chunk], scale, sinks) for t in range(0, T, chunk)]
    return torch.cat([o for o, _ in res])[..., :dv], torch.cat([lse for _, lse in res])


def _shared_chunk(q: Tensor, k: Tensor, v: Tensor, seen: Tensor, scale: float, sinks: Tensor | None
                  ) -> tuple[Tensor, Tensor]:
    T, Hkv, G, _ = q.shape
    L, B = k.shape[1], KEY_BLOCK
    nb = L // B
    kb, vb = k.view(Hkv, nb, B, -1), v.view(Hkv, nb, B, -1)
    seen_b = seen.view(T, nb, B)
    some, every = seen_b.any(-1), seen_b.all(-1)        # [T, nb]: the query sees part / all of block j
    qh = [q[:, h].contiguous() for h in range(Hkv)]     # per-token items [G, d], 64-byte aligned
    # pass 1: the scores of every (block, band of queries that see it), and the exact row max
    m = q.new_full((Hkv, T, G), _NEG_INF)
    blocks = []
    for j in range(nb):
        rows = some[:, j].nonzero()
        if len(rows) == 0:
            continue
        t0, t1 = int(rows[0]), int(rows[-1]) + 1       # causal and window masks see a block from a band of queries
        s = q.new_empty(Hkv, t1 - t0, G, B)
        for h in range(Hkv):
            torch.bmm(qh[h][t0:t1], kb[h, j].transpose(0, 1).expand(t1 - t0, -1, -1), out=s[h])
        s.mul_(scale)
        if not bool(every[t0:t1, j].all()):
            s.masked_fill_(~seen_b[t0:t1, j].view(1, t1 - t0, 1, B), _NEG_INF)
        torch.maximum(m[:, t0:t1], s.amax(-1), out=m[:, t0:t1])
        blocks.append((j, t0, t1, s))
    if sinks is not None:
        m = torch.maximum(m, sinks.view(Hkv, 1, G))
    m_safe = m.masked_fill(m == _NEG_INF, 0.0)
    # pass 2: probabilities and per-block partial sums, combined by the same padded pairwise sum as attend_rows
    width = 1 << max(0, (nb - 1).bit_length())
    l_blk = q.new_zeros(width, Hkv, T, G)
    o_blk = q.new_zeros(width, Hkv, T, G, vb.shape[-1])
    for j, t0, t1, s in blocks:
        s.sub_(m_safe[:, t0:t1, :, None]).exp_()       # now p, in place
        torch.sum(s, -1, out=l_blk[j, :, t0:t1])
        for h in range(Hkv):
            torch.bmm(s[h], vb[h, j].expand(t1 - t0, -1, -1), out=o_blk[j, h, t0:t1])
    l, o = tree_sum(l_blk, 0), tree_sum(o_blk, 0)
    if sinks is not None:
        l = l + torch.exp(sinks.view(Hkv, 1, G) - m_safe)
    out = o / l.clamp(min=torch.finfo(l.dtype).tiny).unsqueeze(-1)
    return out.transpose(0, 1), (m_safe + torch.log(l)).transpose(0, 1)


def block_pad(x: Tensor, dim: int, start: int) -> Tensor:
    """Zero-pad `x` along dim so that it covers whole key blocks, given that its first entry is key `start`
    (a multiple of KEY_BLOCK)."""
    assert start % KEY_BLOCK == 0
    extra = -x.shape[dim] % KEY_BLOCK
    if extra == 0:
        return x
    pad = list(x.shape)
    pad[dim] = extra
    return torch.cat([x, x.new_zeros(pad)], dim)


@attention_form
def attention_invariant(p: Problem, sinks: Tensor | None, return_lse: bool) -> tuple[Tensor, Tensor]:
    """`attnzoo.ops.attention.attention` in batch-invariant form (same signature and conventions)."""
    B_, Tq, H, d = p.q.shape
    Hkv = p.k.shape[2]
    G = H // Hkv
    ct = compute_dtype(p.q.dtype)
    sk = None if sinks is None else sinks.to(ct)
    if p.cu_q is None:
        spans = [(b, 0, Tq, 0, p.k.shape[1]) for b in range(B_)]
    else:
        spans = [(0, a, b, c, e) for a, b, c, e in zip(p.cu_q, p.cu_q[1:], p.cu_k, p.cu_k[1:])]
    out = p.q.new_empty(*p.q.shape[:3], p.v.shape[-1])
    lse = torch.full((B_, H, Tq), _NEG_INF, dtype=ct, device=p.q.device)
    for b, q0, q1, k0, k1 in spans:
        nq, nk = q1 - q0, k1 - k0
        if nq == 0:
            continue
        seen = block_pad(visible(nq, nk, p.window, p.q.device), 1, 0)
        kk = block_pad(p.k[b, k0:k1].to(ct).transpose(0, 1), 1, 0)
        vv = block_pad(p.v[b, k0:k1].to(ct).transpose(0, 1), 1, 0)
        o, l = attend_shared(p.q[b, q0:q1].to(ct).view(nq, Hkv, G, d), kk.contiguous(), vv.contiguous(), seen,
                             p.scale, sk)
        out[b, q0:q1] = o.reshape(nq, H, -1).to(out.dtype)
        lse[b, :, q0:q1] = l.reshape(nq, H).transpose(0, 1)
    return out, (lse if p.cu_q is None else lse[0])
