"""Naive MLA oracles: explicit per-sequence scores and softmax in the inputs' dtype (use float64), and the
paged absorbed decode's spec (its contract: attnzoo.ops.latent.paged)."""

from __future__ import annotations

import torch
from torch import Tensor


def _segments(n: int, cu: Tensor | None) -> list[tuple[int, int]]:
    if cu is None:
        return [(0, n)]
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def mla_reference(q_nope: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor, w_uk: Tensor, w_uv: Tensor, *,
                  scale: float, causal: bool = True, cu_seqlens_q: Tensor | None = None,
                  cu_seqlens_k: Tensor | None = None) -> Tensor:
    """Expanded MLA written out by hand; batched inputs are run one sequence at a time."""
    if q_nope.dim() == 4:
        return torch.stack([mla_reference(q_nope[b], q_pe[b], c_kv[b], k_pe[b], w_uk, w_uv, scale=scale,
                                          causal=causal) for b in range(q_nope.shape[0])])
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    out = q_nope.new_zeros(q_nope.shape[0], q_nope.shape[1], w_uv.shape[1])
    for (qs, qe), (ks, ke) in zip(_segments(q_nope.shape[0], cu_seqlens_q), _segments(c_kv.shape[0], cu_seqlens_k)):
        ckv = c_kv[ks:ke]
        k_nope = torch.einsum("sc,hnc->hsn", ckv, w_uk)                     # [H, Tk, dn]
        v = torch.einsum("sc,hvc->hsv", ckv, w_uv)                          # [H, Tk, dv]
        scores = (torch.einsum("thn,hsn->hts", q_nope[qs:qe], k_nope)
                  + torch.einsum("thr,sr->hts", q_pe[qs:qe], k_pe[ks:ke])) * scale
        tq, tk = qe - qs, ke - ks
        if causal:  # bottom-right aligned: query i sits at key i + tk - tq
            allowed = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(scores, -1).nan_to_num(0.0)  # fully masked rows output 0
        out[qs:qe] = torch.einsum("hts,hsv->thv", p, v)
    return out


def check_paged_decode(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int) -> None:
    """The paged decode's contract (attnzoo.ops.latent.paged), checked by every form."""
    if (q.dim() != 3 or cache.dim() != 3 or q.shape[-1] != cache.shape[-1] or not 0 < dv <= q.shape[-1]
            or block_table.dim() != 2 or block_table.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],)):
        raise ValueError(f"mla_paged_decode: expected q [B, H, Dqk], cache [pages, page_size, Dqk], block_table "
                         f"[B, P], seq_lens [B], 0 < dv <= Dqk; got q {tuple(q.shape)}, cache {tuple(cache.shape)}, "
                         f"block_table {tuple(block_table.shape)}, seq_lens {tuple(seq_lens.shape)}, dv {dv}")


def mla_paged_decode_reference(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int,
                               scale: float) -> Tensor:
    """The spec, one sequence at a time: q [B, H, Dqk] -> [B, H, dv] in q's dtype (0 for an empty sequence)."""
    check_paged_decode(q, cache, block_table, seq_lens, dv)
    B, H, _ = q.shape
    ps = cache.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax precision
    flat = cache.reshape(-1, cache.shape[-1])
    out = torch.zeros(B, H, dv, dtype=acc, device=q.device)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        pos = torch.arange(L, device=cache.device)
        k = flat[block_table[b].long().to(cache.device)[pos // ps] * ps + pos % ps].to(acc)   # [L, Dqk]
        p = torch.softmax((q[b].to(acc) @ k.T) * scale, dim=-1)                               # [H, L]
        out[b] = p @ k[:, :dv]
    return out.to(q.dtype)
