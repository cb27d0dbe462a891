"""Multi-head latent attention (DeepSeek-V3, Kimi Linear): keys and values from one compressed latent per
token, with a decoupled RoPE slice; see docs/mechanisms/ for the absorbed and expanded forms."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from attnzoo.layers import MLAttention
from attnzoo.mechanisms.common import Tensors, cost_shape, take
from attnzoo.ops.sparse import cost as cost_model

if TYPE_CHECKING:
    import torch

    from attnzoo.models.config import ModelConfig

FIELD = "mla"


@dataclass
class Config:
    q_lora_rank: int | None   # None: a full-rank q_proj (Kimi Linear)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int     # what RoPE rotates: ModelConfig.head_dim is this
    v_head_dim: int
    rope_interleave: bool = True


DEFAULTS = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                rope_interleave=True)  # DeepSeek-V3's, as transformers' config


def from_hf(raw: dict[str, Any], **defaults: Any) -> Config:
    """The MLA sizes of a transformers config; `defaults` replace DeepSeek-V3's where a model has others."""
    d = {**DEFAULTS, **defaults}
    return Config(**{f.name: raw.get(f.name, d[f.name]) for f in fields(Config)})


def layer_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """MLAttention's sizes (DSA's too: it is MLA plus an indexer)."""
    m = cfg.mla
    return dict(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, bias=cfg.attention_bias,
                norm_eps=cfg.rms_norm_eps)


def build(cfg: ModelConfig, idx: int) -> MLAttention:
    return MLAttention(idx, cfg.hidden_size, cfg.num_heads, **layer_kwargs(cfg), rope_scaling=cfg.rope_scaling,
                       interleaved_rope=cfg.mla.rope_interleave)


def hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int) -> dict[str, torch.Tensor]:
    """MLA keeps transformers' module names: a one-to-one copy."""
    a, lora = src + "self_attn.", cfg.mla.q_lora_rank is not None
    names = ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"] if lora else ["q_proj.weight"]
    names += ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    if cfg.attention_bias:
        names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] + (["q_a_proj.bias"] if lora else [])
    return {dst + n: take(tensors, a + n) for n in names}


def shape_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.mla
    return dict(v_head_dim=m.v_head_dim, q_lora_rank=m.q_lora_rank or 0, kv_lora_rank=m.kv_lora_rank,
                qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim)


def cost(cfg: ModelConfig, idx: int, context: int) -> tuple[float, float]:
    """(FLOPs, KV bytes read) for the token at `context`: the cost model's absorbed MLA."""
    c = cost_model.cost_per_token("mla", context, cost_shape(cfg, **shape_kwargs(cfg)))
    return c.flops(cost_model.LAYER), c.kv_bytes
