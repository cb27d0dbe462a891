"""MiniMax Sparse Attention (MiniMax-M3; docs/mechanisms/sparse.md §5): GQA whose query heads attend only to the
key blocks their group's index head picks.

Index branch: one index query head per GQA group and one shared index key per token (cached as
`IndexerKeys`), both RMS-normed and roped like the main q/k; token scores q.k (no scale, no ReLU) are
max-pooled over blocks of `block_size` keys anchored at key 0; the `local_blocks` blocks ending at the
query's own block are forced in; each (query, group) keeps its top `topk_blocks` blocks. The main attention
is then block-sparse: a query sees at most topk_blocks * block_size keys, whatever the context length.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.attention import Attention
from attnzoo.layers.batch import Batch, stack_equal
from attnzoo.layers.cache_spec import FullKV, IndexerKeys
from attnzoo.layers.norm import RMSNorm
from attnzoo.ops.rope import apply_rope
from attnzoo.ops.sparse import block_sparse_attention
from attnzoo.ops.sparse.select import msa_block_scores, msa_select_blocks


class MiniMaxSparseAttention(Attention):
    batch_invariant = False   # its block scoring and block-sparse attention have no invariant form yet

    def __init__(self, layer_idx: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 index_head_dim: int, block_size: int, topk_blocks: int, local_blocks: int = 1,
                 norm_eps: float = 1e-6, **attn_kwargs):
        super().__init__(layer_idx, hidden_size, num_heads, num_kv_heads, head_dim, norm_eps=norm_eps, **attn_kwargs)
        self.index_head_dim, self.block_size = index_head_dim, block_size
        self.topk_blocks, self.local_blocks = topk_blocks, local_blocks
        # one fused projection for the index branch: a query head per KV group, then the shared key
        self.index_proj = nn.Linear(hidden_size, (num_kv_heads + 1) * index_head_dim, bias=False)
        self.index_q_norm = RMSNorm(index_head_dim, norm_eps)
        self.index_k_norm = RMSNorm(index_head_dim, norm_eps)

    def cache_spec(self) -> tuple[FullKV, IndexerKeys]:
        return FullKV(self.num_kv_heads, self.head_dim), IndexerKeys(self.index_head_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        q, k, v, gate = self.project(x, rope)
        n, G, dI = x.shape[0], self.num_kv_heads, self.index_head_dim
        iq, ik = self.index_proj(x).split([G * dI, dI], -1)
        iq, ik = self.index_q_norm(iq.view(n, G, dI)), self.index_k_norm(ik)
        if rope is not None:
            iq = apply_rope(iq, *rope)
            ik = apply_rope(ik[:, None], *rope)[:, 0]
        kv_spec, index_spec = self.cache_spec()
        kv, keys = batch.store(self.layer_idx, kv_spec, k, v), batch.store(self.layer_idx, index_spec, ik)
        o = q.new_empty(q.shape[0], self.num_heads, v.shape[-1])
        # sequences with exactly their keys (the block scores are anchored at key 0 and unmasked), those of
        # equal lengths batched together
        for s in stack_equal([p for span in kv.spans for p in span.per_sequence()]):
            kc, vc = kv.gather_kv(s)                                                  # [1, L, Hkv, d]
            U = msa_block_scores(s.take(iq), keys.gather(s), self.block_size, local_blocks=self.local_blocks)
            blocks = msa_select_blocks(U, self.topk_blocks)                           # [1, Tq, G, topk]
            s.put(o, block_sparse_attention(s.take(q), kc.to(q.dtype), vc.to(q.dtype), blocks, self.block_size,
                                            scale=self.head_dim ** -0.5, causal=True))
        return self.output(o, gate)
