"""Softmax attention over every earlier key (full_attention) or the last `sliding_window` (sliding_attention):
MHA / GQA / MQA, with the options of the models that use it (qk-norm, output gate, sinks, value heads of
another width). Its sizes are ModelConfig's own fields (heads, head_dim, sliding_window...), so it has no
config of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from attnzoo.layers import Attention
from attnzoo.mechanisms.common import Tensors, cost_shape, take
from attnzoo.ops.sparse import cost as cost_model

if TYPE_CHECKING:
    from attnzoo.models.config import ModelConfig

FIELD = None  # no ModelConfig field of its own


def build(cfg: ModelConfig, idx: int) -> Attention:
    sliding = cfg.layer_types[idx] == "sliding_attention"
    kv_heads = cfg.sliding_num_kv_heads if sliding and cfg.sliding_num_kv_heads else cfg.num_kv_heads
    return Attention(idx, cfg.hidden_size, cfg.num_heads, kv_heads, cfg.head_dim, bias=cfg.attention_bias,
                     o_bias=cfg.attention_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.rms_norm_eps,
                     window=cfg.sliding_window if sliding else None, output_gate=cfg.attn_output_gate,
                     v_head_dim=cfg.v_head_dim, sinks=sliding and cfg.sliding_sinks,
                     interleaved_rope=cfg.rope_interleaved)


def hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int) -> dict[str, torch.Tensor]:
    """transformers' self_attn.{q,k,v}_proj fused into one qkv_proj (one weight read per step); a value
    scale folded into v's rows. src/dst: the layer's prefixes (model.layers.N. / layers.N.attn.)."""
    a, vs = src + "self_attn.", cfg.value_scale
    out = {dst + "qkv_proj.weight": torch.cat([take(tensors, a + "q_proj.weight"), take(tensors, a + "k_proj.weight"),
                                               take(tensors, a + "v_proj.weight") * vs]),
           dst + "o_proj.weight": take(tensors, a + "o_proj.weight")}
    if cfg.attention_bias:
        out[dst + "qkv_proj.bias"] = torch.cat([take(tensors, a + "q_proj.bias"), take(tensors, a + "k_proj.bias"),
                                                take(tensors, a + "v_proj.bias") * vs])
        out[dst + "o_proj.bias"] = take(tensors, a + "o_proj.bias")
    if a + "attention_sink_bias" in tensors:  # MiMo's sliding layers
        out[dst + "sinks"] = tensors[a + "attention_sink_bias"]
    if cfg.qk_norm:
        out[dst + "q_norm.weight"] = take(tensors, a + "q_norm.weight")
        out[dst + "k_norm.weight"] = take(tensors, a + "k_norm.weight")
    return out


def cost(cfg: ModelConfig, idx: int, context: int) -> tuple[float, float]:
    """(FLOPs, KV bytes read) of the layer for the token at `context`: GQA over min(context, window)."""
    sliding = cfg.layer_types[idx] == "sliding_attention"
    c = cost_model.cost_per_token("gqa", min(context, cfg.sliding_window) if sliding else context, cost_shape(cfg))
    return c.flops(cost_model.LAYER), c.kv_bytes
