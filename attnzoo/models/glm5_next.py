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
from torch import nn

from attnzoo.layers import Batch, DeepseekMoE, RMSNorm, SwiGLU
from attnzoo.layers.delta import KimiDeltaAttention
from attnzoo.layers.dsa_kpool import KPoolDSAttention
from attnzoo.layers.hyper import HyperConnection, hyper_head
from attnzoo.layers.mlp import ClampedGLU
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM


class Glm5NextLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.attn: KimiDeltaAttention | KPoolDSAttention
        if cfg.layer_types[idx] == "linear_attention":
            lin = cfg.linear
            self.attn = KimiDeltaAttention(idx, D, lin["num_v_heads"], lin["k_dim"], lin["conv_width"], eps,
                                           gate_lower_bound=lin.get("gate_lower_bound"))
        else:
            m, d = cfg.mla, cfg.dsa
            self.attn = KPoolDSAttention(
                idx, D, cfg.num_heads, q_lora_rank=m["q_lora_rank"], kv_lora_rank=m["kv_lora_rank"],
                qk_nope_head_dim=m["qk_nope_head_dim"], qk_rope_head_dim=m["qk_rope_head_dim"],
                v_head_dim=m["v_head_dim"], index_n_heads=d["index_n_heads"], index_head_dim=d["index_head_dim"],
                index_topk=d["index_topk"], index_kpool=d["index_kpool"],
                select_tail=d.get("index_kpool_always_select_tail", True),
                shared_indexer=d["indexer_types"][idx] == "shared", bias=cfg.attention_bias, norm_eps=eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        clamp = ClampedGLU(*cfg.mlp_clamp) if cfg.mlp_clamp else None
        self.mlp: SwiGLU | DeepseekMoE
        if cfg.mlp_layer_types[idx] == "sparse":
            e = cfg.moe
            self.mlp = DeepseekMoE(D, e["moe_intermediate_size"], e["n_routed_experts"], e["num_experts_per_tok"],
                                   n_group=e["n_group"], topk_group=e["topk_group"], norm_topk_prob=e["norm_topk_prob"],
                                   routed_scaling_factor=e["routed_scaling_factor"],
                                   n_shared_experts=e["n_shared_experts"], clamp=clamp)
        else:
            self.mlp = SwiGLU(D, cfg.intermediate_size, bias=cfg.mlp_bias, clamp=clamp)
        h = cfg.hyper
        self.attn_hc, self.ffn_hc = (HyperConnection(D, h["hc_mult"], h["hc_sinkhorn_iters"], h["hc_eps"], eps)
                                     for _ in range(2))

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
        streams = x[:, None].expand(-1, self.config.hyper["hc_mult"], -1).contiguous()
        for layer in self.layers:
            streams = layer(streams, None, batch)
        if batch.logits_rows is not None:
            streams = streams[batch.logits_rows]
        return self.lm_head(self.norm(hyper_head(streams)))
