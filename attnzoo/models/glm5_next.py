"""GLM-5.3-Flash (`glm5_next`, text part; docs/mechanisms/sparse.md §6-§7) on DecoderLM's API.

Layers alternate KDA (safe gate, lower bound -5) and k-pool DSA on NoPE MLA, 3:1; the residual is hc_mult
mHC streams [N, n, D]. Per layer:
    x, post, comb = attn_hc(streams);  streams = post * attn(input_layernorm(x)) + comb^T streams
    x, post, comb = ffn_hc(streams);   streams = post * mlp(post_attention_layernorm(x)) + comb^T streams
then the mean of the streams -> norm -> lm_head. MLPs are SwiGLU with transformers' clamp (gate <= limit,
|up| <= limit) in the dense layers, the routed experts and the shared expert; MoE routing is DeepSeek's
(sigmoid, selection bias, groups, renormalise, routed_scaling_factor). No rotary tables anywhere.
"""

from __future__ import annotations

import torch

from attnzoo.layers import Batch
from attnzoo.layers.hyper import hyper_head
from attnzoo.mechanisms import hyper
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM, DecoderLayer


class Glm5NextLayer(DecoderLayer):
    """DecoderLayer (KDA or k-pool DSA from the registry, RMSNorms, clamped MLP / MoE) with an mHC
    connection around each of its two blocks."""

    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__(cfg, idx)
        self.attn_hc, self.ffn_hc = hyper.build(cfg, idx), hyper.build(cfg, idx)

    def forward(self, streams: torch.Tensor, rope: None, batch: Batch) -> torch.Tensor:
        """streams [N, hc_mult, D] -> [N, hc_mult, D]."""
        x, post, comb = self.attn_hc(streams)
        streams = self.attn_hc.expand(self.attn(self.input_layernorm(x), rope, batch), streams, post, comb)
        x, post, comb = self.ffn_hc(streams)
        return self.ffn_hc.expand(self.mlp(self.post_attention_layernorm(x)), streams, post, comb)


class Glm5NextLM(DecoderLM):
    """DecoderLM with mHC residual streams: same forward / forward_batch / cache_specs."""
    layer_cls = Glm5NextLayer

    def __init__(self, cfg: ModelConfig):
        if cfg.hyper is None or cfg.use_rope:
            raise ValueError("Glm5NextLM needs the hyper (mHC) parameters and use_rope=False (NoPE)")
        super().__init__(cfg)

    def forward_batch(self, input_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """input_ids [N] (packed) -> logits [len(batch.logits_rows) or N, V]."""
        x = self.embed_tokens(input_ids)
        streams = x[:, None].expand(-1, self.config.hyper.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer(streams, None, batch)
        if batch.logits_rows is not None:
            streams = streams[batch.logits_rows]
        return self.lm_head(self.norm(hyper_head(streams)))
