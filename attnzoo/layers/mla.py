"""Multi-head Latent Attention layer (DeepSeek-V2/V3; parameter names as transformers' DeepseekV3Attention)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.batch import Batch
from attnzoo.layers.cache_spec import LatentKV
from attnzoo.layers.norm import RMSNorm
from attnzoo.ops.latent import mla_expanded, mla_paged_decode
from attnzoo.ops.rope import apply_rope


def mla_softmax_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim set
    (transformers' yarn_apply_mscale): DeepSeek moves YaRN's temperature into the softmax scale."""
    scale = qk_head_dim ** -0.5
    s = rope_scaling or {}
    m_all, factor = s.get("mscale_all_dim"), float(s.get("factor", 1.0))
    if s.get("rope_type", "default") != "default" and m_all and factor > 1:
        m = 0.1 * m_all * math.log(factor) + 1.0
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    """Caches only the normalised latent c_kv and the shared roped key k_pe (kv_lora_rank + dr per token).

    RoPE (rope_interleave): DeepSeek rotates interleaved pairs; transformers then writes the result
    de-interleaved. q_pe and k_pe get the same permutation, so scores are identical either way: we keep
    the interleaved layout (the cached k_pe is therefore a permutation of transformers' cached k_pe).
    """

    def __init__(self, layer_idx: int, hidden_size: int, num_heads: int, *, q_lora_rank: int | None,
                 kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 bias: bool = False, norm_eps: float = 1e-6, rope_scaling: dict[str, Any] | None = None,
                 interleaved_rope: bool = True):
        super().__init__()
        self.layer_idx, self.num_heads, self.interleaved_rope = layer_idx, num_heads, interleaved_rope
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.dn, self.dr, self.dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias)
        self.scale = mla_softmax_scale(qk, rope_scaling)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (query latent [N, q_lora_rank] or None, q_nope [N, H, dn], q_pe [N, H, dr] rotated,
        c_kv [N, kv_lora_rank] normed, k_pe [N, dr] rotated): the projections the layer attends with (for
        callers outside the forward, e.g. the arena's indexer distillation)."""
        n, H = x.shape[0], self.num_heads
        q_lat = None if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_proj(x) if q_lat is None else self.q_b_proj(q_lat)
        q_nope, q_pe = q.view(n, H, self.dn + self.dr).split([self.dn, self.dr], -1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.dr], -1)
        if rope is not None:
            q_pe = apply_rope(q_pe, *rope, interleaved=self.interleaved_rope)
            k_pe = apply_rope(k_pe[:, None], *rope, interleaved=self.interleaved_rope)[:, 0]
        return q_lat, q_nope, q_pe, self.kv_a_layernorm(c_kv), k_pe

    def _attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, w_uk: torch.Tensor,
                w_uv: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Over the cached latent rows, whatever holds them. Decode is memory-bound: attend over the latent
        rows where they lie (absorbed: MQA over the latent, FlashMLA's shape); prefill is compute-bound:
        expand."""
        ctx = batch.store(self.layer_idx, self.cache_spec(), latent)
        n, H = q_nope.shape[:2]
        o = q_nope.new_empty(n, H, self.dv)
        for s in ctx.spans:
            if s.single_query:
                q_abs = torch.cat([torch.einsum("nhd,hdc->nhc", s.take(q_nope)[:, 0], w_uk), s.take(q_pe)[:, 0]], -1)
                o_lat = mla_paged_decode(q_abs, *ctx.paged(s), self.kv_lora_rank, self.scale)
                s.put(o, torch.einsum("nhc,hvc->nhv", o_lat.to(w_uv.dtype), w_uv))
                continue
            c_all, kpe_all = ctx.gather(s).split([self.kv_lora_rank, self.dr], -1)
            s.put(o, mla_expanded(s.take(q_nope), s.take(q_pe), c_all, kpe_all, w_uk, w_uv, scale=self.scale,
                                  causal=True, cu_seqlens_q=s.cu_seqlens, cu_seqlens_k=s.cu_seqlens))
        return o

    def cache_spec(self) -> LatentKV:
        return LatentKV(self.kv_lora_rank + self.dr)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        n, H = x.shape[0], self.num_heads
        _, q_nope, q_pe, c_kv, k_pe = self.project(x, rope)
        w = self.kv_b_proj.weight.view(H, self.dn + self.dv, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]
        o = self._attend(q_nope, q_pe, torch.cat([c_kv, k_pe], -1), w_uk, w_uv, batch)
        return self.o_proj(o.reshape(n, H * self.dv))
