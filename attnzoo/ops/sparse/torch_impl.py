"""Select-then-attend in plain PyTorch: gather the selected K/V rows, then small dense matmuls.

Per chunk of queries: gather k[b, idx, g] -> [B, C, Hkv, K, d] (index_select on a row view of the
cache, in place, even for a column slice such as the first 512 dims of an MLA latent), scores
q[B, C, Hkv, G, d] @ kg^T -> [B, C, Hkv, G, K] (one gathered row serves all G heads of its group),
masked softmax, @ vg. The chunk size keeps the gathered rows under a memory budget, so prefill over
a long cache never materialises [Tq, K, d] at once. Differentiable by autograd (the gather's backward
is a scatter-add); with grad on and more than one chunk, each chunk is checkpointed so the backward
also stays within the budget (it re-gathers instead of keeping every chunk's rows alive).

Block selections expand to token positions (block * bs + r); blocks are deduped first, so the
expanded tokens are distinct and come in contiguous runs of bs, which is what the gather likes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnzoo.ops.attention.reference import compute_dtype
from attnzoo.ops.sparse.reference import blocks_to_token_indices, check_sparse

_NEG_INF = float("-inf")
BUDGET_BYTES = 64 << 20  # gathered K/V rows + scores per chunk


def dedupe(indices: Tensor) -> Tensor:
    """Sort each row and turn repeats into -1, so a key named twice counts once. Sorting also makes
    the later gather walk the cache forward. -1 slots sort first and stay -1."""
    s = indices.sort(-1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    return s.masked_fill(dup, -1)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, Tk, Hkv, d], idx [B, C, Hkv, K] -> x[b, idx[b, c, g, j], g] as [B, C, Hkv, K, d] (-1 reads row 0).
    index_select on a [B*Tk*Hkv, d] row view is ~30x faster on CPU than 3-tensor advanced indexing; the
    view exists without a copy for contiguous caches and for column slices such as latent[..., :512]."""
    B, Tk, Hkv, d = x.shape
    safe = idx.clamp(min=0)
    bi = torch.arange(B, device=idx.device)[:, None, None, None]
    hi = torch.arange(Hkv, device=idx.device)[None, None, :, None]
    try:
        rows = x.view(B * Tk * Hkv, d)
    except RuntimeError:  # strides that do not merge: advanced indexing still reads in place
        return x[bi, safe, hi]
    return rows.index_select(0, ((bi * Tk + safe) * Hkv + hi).flatten()).view(*idx.shape, d)


def _chunk(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, pos0: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, C, H, d], idx [B, C, Hkv, K] (deduped, -1 = unused); query c sits at key pos0 + c.
    -> out [B, C, H, dv] (q dtype), lse [B, C, H] (compute dtype)."""
    B, C, H, d = q.shape
    Hkv, dv = k.shape[2], v.shape[-1]
    G, K = H // Hkv, idx.shape[-1]
    ct = compute_dtype(q.dtype)
    dev = q.device
    valid = idx >= 0
    if causal:
        valid &= idx <= (pos0 + torch.arange(C, device=dev))[None, :, None, None]
    kg = _gather(k, idx).to(ct)  # [B, C, Hkv, K, d]: only the selected rows are read
    vg = _gather(v, idx).to(ct)
    qg = q.to(ct).view(B, C, Hkv, G, d)
    s = (qg @ kg.transpose(-1, -2)) * scale  # [B, C, Hkv, G, K]
    s = s.masked_fill(~valid[..., None, :], _NEG_INF)
    m = s.amax(-1, keepdim=True) if K > 0 else s.new_zeros(B, C, Hkv, G, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # dead rows: exp(-inf) = 0
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    live = den > 0
    den_safe = torch.where(live, den, torch.ones_like(den))
    out = (e / den_safe) @ vg  # [B, C, Hkv, G, dv]
    lse = torch.where(live, torch.log(den_safe) + m, torch.full_like(m, _NEG_INF))
    return out.reshape(B, C, H, dv).to(q.dtype), lse.reshape(B, C, H)


def _run(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, causal: bool,
         return_lse: bool, chunk: int | None) -> Tensor | tuple[Tensor, Tensor]:
    B, Tq, H, d = q.shape
    Tk, Hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    if Tk == 0:  # only -1 slots are legal: nothing to read (and no row 0 to clamp to)
        idx = idx[..., :0]
    K = idx.shape[-1]
    isz = torch.finfo(compute_dtype(q.dtype)).bits // 8
    per_query = max(1, B * Hkv * K * (d + dv + 3 * (H // Hkv)) * isz)
    C = chunk if chunk is not None else max(1, BUDGET_BYTES // per_query)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, lses = [], []
    for c0 in range(0, Tq, C):
        c1 = min(Tq, c0 + C)
        args = (q[:, c0:c1], k, v, idx[:, c0:c1], c0 + Tk - Tq, causal, scale)
        if grad and Tq > C:
            o, l = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            o, l = _chunk(*args)
        outs.append(o)
        lses.append(l)
    if Tq == 0:
        out = q.new_zeros(B, 0, H, dv)
        lse = torch.zeros(B, 0, H, dtype=compute_dtype(q.dtype), device=q.device)
    else:
        out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, 1), torch.cat(lses, 1))
    return (out, lse.permute(0, 2, 1)) if return_lse else out


def sparse_attention_torch(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scale: float | None = None,
                           causal: bool = True, return_lse: bool = False,
                           chunk: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Token-sparse attention; see attnzoo.ops.sparse.sparse_attention. chunk: queries per gather
    (default: as many as fit BUDGET_BYTES)."""
    sc = check_sparse(q, k, v, indices, scale)
    return _run(q, k, v, dedupe(indices.long()), sc, causal, return_lse, chunk)


def block_sparse_attention_torch(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_size: int, *,
                                 scale: float | None = None, causal: bool = True, return_lse: bool = False,
                                 chunk: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention; see attnzoo.ops.sparse.block_sparse_attention."""
    sc = check_sparse(q, k, v, block_indices, scale, block_size=block_size, what="block_sparse_attention")
    tok = blocks_to_token_indices(dedupe(block_indices.long()), block_size, k.shape[1])
    return _run(q, k, v, tok, sc, causal, return_lse, chunk)
