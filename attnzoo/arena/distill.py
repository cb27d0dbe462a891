"""Training the index branches that the LM loss cannot reach.

DSA's lightning indexer and MSA's index branch choose keys by top-k, which has no gradient: trained on the
LM loss alone they would stay at their random initialisation and select keys at random. As DeepSeek-V3.2
(dense warm-up) and MiniMax-M3 do, they learn by distillation instead: a KL divergence from the main
attention's distribution (summed over heads for DSA, averaged over each GQA group for MSA) to the index
scores, over every causal key (the dense warm-up form, used for the whole arena run). The branch reads the
layer's input detached, so the main model learns only from the LM loss and the index branch only from this.

Which layers have an index branch, and its loss, the registry says (a family's `Distill`: DSA's and MSA's
`index_kl` in attnzoo/mechanisms/). `IndexerDistillation(model, sequences)` hooks those layers (forward
pre-hooks: no change to the layers); after each forward, `loss()` returns the mean KL per query token and
index branch over the first `sequences` sequences of the packed batch (a sample is enough to distil, and the
teacher costs O(T^2) per head), or None for models without an index branch.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.mechanisms import family_of
from attnzoo.models.decoder import DecoderLM


class IndexerDistillation:
    def __init__(self, model: DecoderLM, sequences: int = 2):
        self.sequences = sequences
        # the layers whose family declares an index branch to distil, and each one's loss
        self.losses = {}
        for i, layer in enumerate(model.layers):
            d = family_of(model.config, i).distill
            if d is not None and d.has_branch(layer.attn):
                self.losses[layer.attn] = d.loss
        self.layers = list(self.losses)
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
            total = total + self.losses[layer](layer, x, rope, cu.tolist())
        self.captured = []
        return total / len(self.layers)
