"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5; docs/mechanisms/sparse.md §3-§4): MLA whose queries each
attend only to the top-k previous tokens chosen by a lightning indexer.

The indexer reads MLA's normalised query latent (wq_b), keeps one key per token (wk + LayerNorm, cached as
`IndexerKeys`), rotates the first qk_rope_head_dim dims of both (half-split in DeepSeek-V3.2, interleaved
in GLM-5), and scores I[t,s] = sum_h w[t,h] ReLU(q[t,h].k[s] / sqrt(dI)). All heads share the selection, so
attention runs in MLA's absorbed (MQA) form over the selected latent rows: one 576-wide row per selected
token, read once for all heads. IndexShare (GLM-5.2): a "shared" layer has no indexer and no indexer cache;
it reuses the selection of the most recent "full" layer in the same step (passed down in `batch.shared`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.batch import Batch, stack_equal
from attnzoo.layers.cache_spec import IndexerKeys, LatentKV
from attnzoo.layers.mla import MLAttention
from attnzoo.ops.latent.sparse import mla_sparse_absorbed
from attnzoo.ops.rope import apply_rope
from attnzoo.ops.sparse.select import lightning_indexer_scores, topk_indices

SHARED_KEY = "dsa_selection"  # batch.shared entry: per span of the step, the selected rows [R*T, k]


class DSAttention(MLAttention):
    def __init__(self, layer_idx: int, hidden_size: int, num_heads: int, *, q_lora_rank: int, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, index_n_heads: int,
                 index_head_dim: int, index_topk: int, indexer_interleaved_rope: bool = False,
                 shared_indexer: bool = False, **mla_kwargs: Any):
        super().__init__(layer_idx, hidden_size, num_heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
                         qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                         v_head_dim=v_head_dim, **mla_kwargs)
        if q_lora_rank is None:
            raise ValueError("DSA's indexer reads the query latent: q_lora_rank must be set")
        self.index_n_heads, self.index_head_dim, self.index_topk = index_n_heads, index_head_dim, index_topk
        self.indexer_interleaved_rope, self.shared_indexer = indexer_interleaved_rope, shared_indexer
        if not shared_indexer:
            self.wq_b = nn.Linear(q_lora_rank, index_n_heads * index_head_dim, bias=False)
            self.wk = nn.Linear(hidden_size, index_head_dim, bias=False)
            self.k_norm = nn.LayerNorm(index_head_dim, eps=1e-6)
            self.weights_proj = nn.Linear(hidden_size, index_n_heads, bias=False)

    def cache_spec(self) -> LatentKV | tuple[LatentKV, IndexerKeys]:
        if self.shared_indexer:
            return LatentKV(self.kv_lora_rank + self.dr)
        return LatentKV(self.kv_lora_rank + self.dr), IndexerKeys(self.index_head_dim)

    def indexer(self, x: torch.Tensor, q_lat: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [N, HI, dI], k [N, dI], head weights [N, HI] float32)."""
        n, r = x.shape[0], self.dr
        q = self.wq_b(q_lat).view(n, self.index_n_heads, self.index_head_dim)
        k = self.k_norm(self.wk(x))
        if rope is not None:  # rotary part first, then the pass-through part
            q = torch.cat([apply_rope(q[..., :r], *rope, interleaved=self.indexer_interleaved_rope), q[..., r:]], -1)
            k = torch.cat([apply_rope(k[:, None, :r], *rope, interleaved=self.indexer_interleaved_rope)[:, 0],
                           k[:, r:]], -1)
        w = self.weights_proj(x).float() * self.index_n_heads ** -0.5
        return q, k, w

    def _select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None
                ) -> torch.Tensor:
        """Queries q [B, Tq, HI, dI] (the last Tq positions of their sequences) against keys [B, Tk, dI]
        -> selected key positions [B, Tq, k], -1 where fewer than k keys are visible."""
        scores = lightning_indexer_scores(q, keys, w, scale=self.index_head_dim ** -0.5)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        return topk_indices(scores, min(self.index_topk, keys.shape[1]))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        n, H = x.shape[0], self.num_heads
        q_lat = self.q_a_layernorm(self.q_a_proj(x))
        q_nope, q_pe = self.q_b_proj(q_lat).view(n, H, self.dn + self.dr).split([self.dn, self.dr], -1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.dr], -1)
        c_kv = self.kv_a_layernorm(c_kv)
        if rope is not None:
            q_pe = apply_rope(q_pe, *rope, interleaved=self.interleaved_rope)
            k_pe = apply_rope(k_pe[:, None], *rope, interleaved=self.interleaved_rope)[:, 0]
        w = self.kv_b_proj.weight.view(H, self.dn + self.dv, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]
        iq = ik = iw = None
        if not self.shared_indexer:
            iq, ik, iw = self.indexer(x, q_lat, rope)
        specs = self.cache_spec()
        lat = batch.store(self.layer_idx, specs if self.shared_indexer else specs[0], torch.cat([c_kv, k_pe], -1))
        # selection runs batched per span, never packed; equal-length sequences share one span
        spans = stack_equal([p for s in lat.spans for p in s.unpacked()])
        q_abs = torch.cat([torch.einsum("nhd,hdc->nhc", q_nope, w_uk), q_pe], -1)
        o = q_nope.new_empty(n, H, self.kv_lora_rank)
        if self.shared_indexer:
            if SHARED_KEY not in batch.shared:
                raise ValueError(f"layer {self.layer_idx} shares its indexer but no earlier layer ran one")
            chosen = batch.shared[SHARED_KEY]
        else:
            keys = batch.store(self.layer_idx, specs[1], ik)
            chosen = []
            for s in spans:  # the latent's spans address the indexer keys too: same tokens, same page table
                pos = self._select(s.take(iq), s.take(iw), keys.gather(s), s.valid)        # [R, T, k]
                R, T, k = pos.shape
                rows = s.keys.gather(1, pos.clamp(min=0).reshape(R, T * k)).view(R, T, k)
                chosen.append(torch.where(pos >= 0, rows, -1).flatten(0, 1))
            batch.shared[SHARED_KEY] = chosen
        for s, sel in zip(spans, chosen):
            rows = s.rows.flatten()
            o[rows] = mla_sparse_absorbed(q_abs[rows], lat.rows, sel, self.kv_lora_rank, self.scale).to(o.dtype)
        o = torch.einsum("nhc,hvc->nhv", o, w_uv)
        return self.o_proj(o.reshape(n, H * self.dv))

