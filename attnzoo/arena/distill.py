"""Training the index branches that the LM loss cannot reach.

DSA's lightning indexer and MSA's index branch choose keys by top-k, which has no gradient: trained on the
LM loss alone they would stay at their random initialisation and select keys at random. As DeepSeek-V3.2
(dense warm-up) and MiniMax-M3 do, they learn by distillation instead: a KL divergence from the main
attention's distribution (summed over heads for DSA, averaged over each GQA group for MSA) to the index
scores, over every causal key (the dense warm-up form, used for the whole arena run). The branch reads the
layer's input detached, so the main model learns only from the LM loss and the index branch only from this.

`IndexerDistillation(model, sequences)` hooks the layers (forward pre-hooks: no change to the layers); after
each forward, `loss()` returns the mean KL per query token and index branch over the first `sequences`
sequences of the packed batch (a sample is enough to distil, and the teacher costs O(T^2) per head), or None
for models without an index branch.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.dsa import DSAttention
from attnzoo.layers.msa import MiniMaxSparseAttention
from attnzoo.ops.rope import apply_rope
from attnzoo.ops.sparse.kl import indexer_kl_loss, msa_indexer_kl_loss
from attnzoo.ops.sparse.select import lightning_indexer_scores


class IndexerDistillation:
    def __init__(self, model: nn.Module, sequences: int = 2):
        self.sequences = sequences
        self.layers = [m for m in model.modules() if (isinstance(m, DSAttention) and not m.shared_indexer)
                       or isinstance(m, MiniMaxSparseAttention)]
        self.captured: list[tuple[nn.Module, torch.Tensor, object, torch.Tensor]] = []
        self.handles = [m.register_forward_pre_hook(self._capture) for m in self.layers]

    def __bool__(self) -> bool:
        return bool(self.layers)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():  # training steps only; evaluation keeps nothing
            x, rope, batch = args
            cu = batch.cu_seqlens[:self.sequences + 1]
            n = int(cu[-1])
            rope = None if rope is None else tuple(r[:n] for r in rope)
            self.captured.append((module, x[:n].detach(), rope, cu))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def loss(self) -> torch.Tensor | None:
        if not self.captured:
            return None
        total = 0.0
        for layer, x, rope, cu in self.captured:
            fn = _dsa_kl if isinstance(layer, DSAttention) else _msa_kl
            total = total + fn(layer, x, rope, cu.tolist())
        self.captured = []
        return total / len(self.layers)


def _dsa_kl(layer: DSAttention, x: torch.Tensor, rope, cu: list[int]) -> torch.Tensor:
    n, H, dn, dr = x.shape[0], layer.num_heads, layer.dn, layer.dr
    with torch.no_grad():  # the teacher: MLA's expanded q/k, as the layer computes them
        q_lat, q_nope, q_pe, c_kv, k_pe = layer.project(x, rope)
        w_uk = layer.kv_b_proj.weight.view(H, dn + layer.dv, layer.kv_lora_rank)[:, :dn]
        k_nope = torch.einsum("nc,hdc->nhd", c_kv, w_uk)
        q = torch.cat([q_nope, q_pe], -1)
        k = torch.cat([k_nope, k_pe[:, None].expand(n, H, dr)], -1)
    iq, ik, iw = layer.indexer(x, q_lat, rope)   # the student, with gradients into the indexer only
    loss = x.new_zeros(())
    for a, b in zip(cu[:-1], cu[1:]):
        scores = lightning_indexer_scores(iq[None, a:b], ik[None, a:b], iw[None, a:b],
                                          scale=layer.index_head_dim ** -0.5)
        loss = loss + indexer_kl_loss(scores, q=q[None, a:b], k=k[None, a:b], scale=layer.scale)
    return loss / n


def _msa_kl(layer: MiniMaxSparseAttention, x: torch.Tensor, rope, cu: list[int]) -> torch.Tensor:
    n, G, dI, bs = x.shape[0], layer.num_kv_heads, layer.index_head_dim, layer.block_size
    with torch.no_grad():
        q, k, _, _ = layer.project(x, rope)
    iq, ik = layer.index_proj(x).split([G * dI, dI], -1)
    iq, ik = layer.index_q_norm(iq.view(n, G, dI)), layer.index_k_norm(ik)
    if rope is not None:
        iq = apply_rope(iq, *rope)
        ik = apply_rope(ik[:, None], *rope)[:, 0]
    loss = x.new_zeros(())
    for a, b in zip(cu[:-1], cu[1:]):
        T = b - a
        nb = -(-T // bs)
        every = torch.arange(nb, device=x.device).expand(1, T, G, nb)  # dense: every block allowed
        loss = loss + msa_indexer_kl_loss(q[None, a:b], k[None, a:b], iq[None, a:b], ik[None, a:b], every, bs,
                                          scale=layer.head_dim ** -0.5, loss_coeff=float(T))
    return loss / n   # loss_coeff T undoes the per-sequence 1 / (G * T): the sum over sequences / n tokens
