"""MLA in PyTorch on top of attnzoo.ops.attention: expanded (prefill) and absorbed (decode) forms."""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.ops.attention import attention


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
