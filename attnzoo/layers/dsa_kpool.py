"""GLM-5.3-Flash's k-pool DSA (`glm5_next`; docs/mechanisms/sparse.md §6): DeepSeek Sparse Attention whose
indexer scores pools of `index_kpool` consecutive tokens instead of single tokens.

Per token the indexer keeps k_I = LayerNorm(W_k x) and pooling logits z = W_gate x (both [dI]). Pool p
(tokens pP .. pP+P-1, counted from position 0: our sequences have no left padding) has the key
    K_p[c] = sum_j softmax_j(z[pP + j, c] + ape[j, c]) * k_I[pP + j, c]      (a softmax per channel c)
and query t scores it as in DSA: I[t, p] = sum_h w[t, h] ReLU(q_I[t, h] . K_p / sqrt(dI)). Candidates are the
complete pools whose last token is <= t; the top (index_topk / P) are kept, all their tokens selected, plus
(index_kpool_always_select_tail) the visible tokens of t's incomplete pool. No pool is forced: a query's own
complete pool competes like any other. Indices are -1 padded to index_topk + P - 1.

The per-token cache row is [k_I | z] (an `IndexerKeys(2 * dI)` spec), so the pools are rebuilt from raw rows
each step exactly as in transformers (which caches [k_I | z | valid]); this keeps DSAttention's per-span
selection unchanged for the no-cache, ContiguousKVCache and paged-engine paths. NoPE: no rotary anywhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.cache_spec import IndexerKeys, LatentKV
from attnzoo.layers.dsa import DSAttention
from attnzoo.ops.sparse.select import lightning_indexer_scores, topk_indices


def kpool_select(q: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor | None, *,
                 ape: torch.Tensor, index_topk: int, select_tail: bool = True) -> torch.Tensor:
    """k-pool selection for queries q [B, Tq, HI, dI] with head weights w [B, Tq, HI] (HI**-0.5 folded in)
    that are the last Tq visible positions of their sequences, over cached rows [B, Tk, 2*dI] = [k_I | z]
    at positions 0..Tk-1; valid [B, Tk] marks each row's visible prefix (None: all). ape [P, dI].
    Returns selected key positions [B, Tq, index_topk + P - 1] (int64, -1 padded; a set)."""
    B, Tq, HI, dI = q.shape
    Tk, P = rows.shape[1], ape.shape[0]
    k, z = rows.split([dI, dI], -1)
    seen = torch.full((B,), Tk, device=q.device) if valid is None else valid.sum(-1)
    pos = seen[:, None] - Tq + torch.arange(Tq, device=q.device)                    # [B, Tq] query positions
    n_pools = Tk // P                                                               # pools within the rows
    logits = z[:, : n_pools * P].float().view(B, n_pools, P, dI) + ape.float()
    pooled = (logits.softmax(2).to(k.dtype) * k[:, : n_pools * P].view(B, n_pools, P, dI)).sum(2)
    scores = lightning_indexer_scores(q, pooled, w, scale=dI ** -0.5, causal=False)  # [B, Tq, n_pools]
    ends = (torch.arange(n_pools, device=q.device) + 1) * P - 1
    scores = scores.masked_fill(ends > pos[..., None], float("-inf"))              # complete and in the past
    best = topk_indices(scores, min(index_topk // P, n_pools))                     # [B, Tq, kp], -1 if none
    toks = torch.where(best[..., None] >= 0, best[..., None] * P + torch.arange(P, device=q.device), -1)
    out = [toks.flatten(-2)]
    if select_tail:  # t's incomplete pool: positions floor((t+1)/P)*P .. t
        tail = ((pos + 1) // P * P)[..., None] + torch.arange(P - 1, device=q.device)
        out.append(torch.where(tail <= pos[..., None], tail, -1))
    sel = torch.cat(out, -1)
    return F.pad(sel, (0, index_topk + P - 1 - sel.shape[-1]), value=-1)


class KPoolDSAttention(DSAttention):
    """DSAttention (NoPE MLA, absorbed sparse attention over the selected latent rows) with the k-pool
    indexer. `index_kpool_compress_gate` [dI, D] and `index_kpool_compress_ape` [P, dI] as in transformers
    (zero-initialised: plain mean pooling until trained)."""

    def __init__(self, layer_idx: int, hidden_size: int, num_heads: int, *, index_kpool: int,
                 select_tail: bool = True, **dsa_kwargs: Any):
        super().__init__(layer_idx, hidden_size, num_heads, **dsa_kwargs)
        if self.dr:
            raise ValueError(f"the k-pool indexer is NoPE: qk_rope_head_dim must be 0, got {self.dr}")
        if index_kpool < 1 or self.index_topk % index_kpool:
            raise ValueError(f"index_topk {self.index_topk} must be a positive multiple of index_kpool {index_kpool}")
        self.index_kpool, self.select_tail = index_kpool, select_tail
        if not self.shared_indexer:
            self.index_kpool_compress_gate = nn.Parameter(torch.zeros(self.index_head_dim, hidden_size))
            self.index_kpool_compress_ape = nn.Parameter(torch.zeros(index_kpool, self.index_head_dim))

    def cache_spec(self) -> LatentKV | tuple[LatentKV, IndexerKeys]:
        if self.shared_indexer:
            return LatentKV(self.kv_lora_rank)
        return LatentKV(self.kv_lora_rank), IndexerKeys(2 * self.index_head_dim)  # [k_I | z] per token

    def indexer(self, x: torch.Tensor, q_lat: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if rope is not None:
            raise ValueError("the k-pool indexer is NoPE: the model must not pass rotary tables")
        q, k, w = super().indexer(x, q_lat, None)
        return q, torch.cat([k, F.linear(x, self.index_kpool_compress_gate)], -1), w

    def _select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None
                ) -> torch.Tensor:
        return kpool_select(q, w, keys, valid, ape=self.index_kpool_compress_ape, index_topk=self.index_topk,
                            select_tail=self.select_tail)
