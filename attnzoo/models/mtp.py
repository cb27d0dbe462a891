"""DeepSeek-V3's multi-token prediction (MTP) modules (technical report §2.2): `forward` over full sequences,
`forward_batch` over a packed step with a cache (the engine's MTP drafter, engine/mtp_drafter.py).

The (first) module at position i reads h_i, the main model's last-layer output, and the embedding of the next
token t_{i+1}, and predicts t_{i+2}:

    h'_i    = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])   embedding first, as the checkpoints are read by
                                                           vLLM, SGLang and Megatron-LM (the report writes [h; e])
    h''     = block(h'_0 .. h'_{T-1})                      one decoder layer (MLA, MoE), causal over the
                                                           sequence, at the main model's positions
    logits  = lm_head(norm(h''))                           norm: shared_head.norm; lm_head: the main model's

h_i is whatever the caller passes: `DecoderLM.forward(..., return_hidden=True)` gives the last layer's output
before the final norm (the report's "representation given by the main model" read literally); vLLM, SGLang
and Megatron-LM pass the output after the main model's final norm, `model.norm(h)`.

The embedding, the LM head and the RoPE tables are the main model's (a checkpoint's shared_head.head that
differs from lm_head is kept as the module's own). Checkpoint names: module k's under
model.layers.{num_hidden_layers + k}.* (enorm, hnorm, eh_proj, shared_head.*, and the block's input_layernorm,
self_attn, post_attention_layernorm, mlp); `mtp_layers` says whether a checkpoint's are loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attnzoo.layers import Batch
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLayer, make_norm

if TYPE_CHECKING:
    from attnzoo.models.decoder import DecoderLM

log = logging.getLogger("attnzoo.models")

ARCHITECTURES = ("deepseek_v3",)   # whose MTP modules load; other checkpoints' stay unread (logged)


def mtp_block_config(cfg: ModelConfig) -> ModelConfig:
    """The config the block is built from: the main model's with one more layer, index num_layers, of the last
    layer's attention type and, like every DeepSeek layer at or past first_k_dense_replace, MoE."""
    sparse = cfg.moe is not None and cfg.num_layers >= cfg.moe.first_k_dense_replace
    return cfg.evolve(num_layers=cfg.num_layers + 1, layer_types=[*cfg.layer_types, cfg.layer_types[-1]],
                      mlp_layer_types=[*cfg.mlp_layer_types, "sparse" if sparse else "dense"], num_mtp_layers=0)


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, main: DecoderLM):
        super().__init__()
        self._main = (main,)   # a tuple, so the main model is not registered as a child (nor its weights twice)
        self.enorm, self.hnorm = make_norm(cfg), make_norm(cfg)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(mtp_block_config(cfg), cfg.num_layers)
        self.norm = make_norm(cfg)   # shared_head.norm
        self.lm_head: nn.Linear | None = None   # the main model's unless the loader sets one

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, return_hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H]: the main model's h_0..h_{T-1} (`DecoderLM.forward(..., return_hidden=True)`);
        next_ids [B, T]: t_1..t_T -> logits [B, T, V] for t_2..t_{T+1} (and the block's output [B, T, H])."""
        B, T, H = hidden.shape
        out = self.forward_batch(hidden.reshape(B * T, H), next_ids.reshape(-1), Batch.dense(B, T, 0, hidden.device),
                                 return_hidden=True)
        logits, x = (t.view(B, T, -1) for t in out)
        return (logits, x) if return_hidden else logits

    def forward_batch(self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: Batch, return_hidden: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The packed form (what the engine's MTP drafter runs, engine/mtp_drafter.py): hidden [N, H] and
        next_ids [N] -> logits at batch.logits_rows (all rows when None); return_hidden: also the block's
        output at every row, before the norm (what a chained draft reads in place of h)."""
        main = self._main[0]
        e = self.enorm(main.embed_tokens(next_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))
        x = self.block(x, main.ropes(batch.positions)[-1], batch)   # the block has the last layer's type
        head = main.lm_head if self.lm_head is None else self.lm_head
        logits = head(self.norm(x if batch.logits_rows is None else x[batch.logits_rows]))
        return (logits, x) if return_hidden else logits


def mtp_layers(raw: dict[str, Any], cfg: ModelConfig, names: Collection[str]) -> int:
    """How many MTP modules to load: config.json's num_nextn_predict_layers where the checkpoint holds their
    weights (`names`); 0, logged, where it declares some and they are missing or not of DeepSeek-V3."""
    n = raw.get("num_nextn_predict_layers") or 0
    if not n:
        return 0
    if cfg.architecture not in ARCHITECTURES:
        log.info("%s declares %d MTP layer(s); attnzoo loads MTP for %s only: loading without them",
                 cfg.architecture, n, ", ".join(ARCHITECTURES))
        return 0
    absent = [cfg.num_layers + k for k in range(n) if f"model.layers.{cfg.num_layers + k}.eh_proj.weight" not in names]
    if absent:
        log.info("config.json declares %d MTP layer(s) but the checkpoint has no model.layers.%s.*: "
                 "loading without MTP", n, absent[0])   # common: many redistributions drop them
        return 0
    return n


def mtp_tensor(name: str, cfg: ModelConfig) -> bool:
    """Whether a transformers-named tensor belongs to a layer past the main model's (an MTP module)."""
    return name.startswith("model.layers.") and int(name.split(".", 3)[2]) >= cfg.num_layers
