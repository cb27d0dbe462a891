"""MLA in PyTorch: expanded (prefill) and absorbed (decode) forms on top of attnzoo.ops.attention, and the
absorbed decode over a paged latent cache."""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.ops.attention import attention
from attnzoo.ops.latent.reference import check_paged_decode


def mla_expanded(q_nope: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor, w_uk: Tensor, w_uv: Tensor, *,
                 scale: float, causal: bool = True, cu_seqlens_q: Tensor | None = None,
                 cu_seqlens_k: Tensor | None = None) -> Tensor:
    """Up-project the latent to per-head K (nope part) and V, then plain MHA with dqk = dn + dr."""
    H = q_nope.shape[-2]
    k_nope = torch.einsum("...c,hnc->...hn", c_kv, w_uk)
    v = torch.einsum("...c,hvc->...hv", c_kv, w_uv)
    k_rope = k_pe.unsqueeze(-2).expand(*k_pe.shape[:-1], H, k_pe.shape[-1])
    q = torch.cat([q_nope, q_pe], -1)
    k = torch.cat([k_nope, k_rope], -1)
    return attention(q, k, v, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)


def mla_absorbed(q_nope: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor, w_uk: Tensor, w_uv: Tensor, *,
                 scale: float, causal: bool = True, cu_seqlens_q: Tensor | None = None,
                 cu_seqlens_k: Tensor | None = None) -> Tensor:
    """q_nope.(W_UK c) = (W_UK^T q_nope).c: attend in latent space as MQA (one KV head of dc + dr,
    values = the first dc dims), then apply W_UV per head. The scale stays (dn + dr)^-0.5-based: the
    scores are identical to the expanded form's, only computed in a different order."""
    q_lat = torch.einsum("...hn,hnc->...hc", q_nope, w_uk)
    q = torch.cat([q_lat, q_pe], -1)
    k = torch.cat([c_kv, k_pe], -1).unsqueeze(-2)
    o_lat = attention(q, k, c_kv.unsqueeze(-2), causal=causal, scale=scale,
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return torch.einsum("...hc,hvc->...hv", o_lat, w_uv)


def mla_paged_decode_torch(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int,
                           scale: float) -> Tensor:
    """Batched CPU form: gather whole pages once per sequence (shared by all H heads), then one
    [H, Dqk] x [Dqk, L] product per sequence and a masked softmax. Same contract as the reference."""
    check_paged_decode(q, cache, block_table, seq_lens, dv)
    B, H, D = q.shape
    ps = cache.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax precision
    lens = seq_lens.to(cache.device, torch.long)
    width = -(-int(lens.max()) // ps) if B else 0   # one host sync: pages of the longest sequence
    if width == 0:
        return q.new_zeros(B, H, dv)
    table = block_table[:, :width].to(cache.device, torch.long)
    used = torch.arange(width, device=cache.device) < (-(-lens // ps))[:, None]
    pages = torch.where(used, table, 0)   # entries past a sequence's pages may be stale: read page 0 instead
    # index_select over whole pages of a [pages, page_size * Dqk] view: page-sized copies, not row-sized.
    k = torch.index_select(cache.reshape(cache.shape[0], -1), 0, pages.reshape(-1)).view(B, width * ps, D).to(acc)
    s = torch.bmm(q.to(acc), k.transpose(1, 2)).mul_(scale)                    # [B, H, width * page]
    valid = torch.arange(width * ps, device=cache.device) < lens[:, None]
    s.masked_fill_(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse.clamp(min=torch.finfo(acc).min))                   # an empty sequence gives 0
    return torch.bmm(p, k[..., :dv]).to(q.dtype)
