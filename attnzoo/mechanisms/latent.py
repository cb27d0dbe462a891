"""Multi-head latent attention (DeepSeek-V3, Kimi Linear): keys and values from one compressed latent per
token, with a decoupled RoPE slice; see docs/mechanisms/ for the absorbed and expanded forms. Serves
full/sliding layers when the model sets `mla` (and no family refining it, DSA, applies).

Architectures read here: deepseek_v3. Tensor parallelism: query heads split (q_proj / q_b_proj and kv_b_proj
rows, o_proj columns); the latent path (q_a, kv_a, their norms) and the latent cache replicated on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from attnzoo.errors import ModelLoadError
from attnzoo.layers import MLAttention
from attnzoo.layers.cache_spec import CacheKind
from attnzoo.mechanisms import ffn
from attnzoo.mechanisms.common import Tensors, cost_shape, even, take
from attnzoo.mechanisms.registry import Contestant, Family, Ranges, Sharding
from attnzoo.ops.sparse import cost as cost_model

if TYPE_CHECKING:
    import torch

    from attnzoo.arena.mechanisms import Shape
    from attnzoo.distributed import ParallelContext
    from attnzoo.models.config import ModelConfig


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
    c = cost_model.cost_per_token(cost_model.mla_terms, context, cost_shape(cfg, **shape_kwargs(cfg)))
    return c.flops(cost_model.LAYER), c.kv_bytes


def deepseek_v3(raw: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 (and the DSA models on it): MLA everywhere, DeepSeek MoE after the first dense layers."""
    mla, moe = from_hf(raw), ffn.deepseek_moe(raw)
    if raw.get("mlp_layer_types"):
        moe.first_k_dense_replace = raw["mlp_layer_types"].count("dense")
        if raw["mlp_layer_types"] != sorted(raw["mlp_layer_types"]):  # dense first, then sparse
            raise ModelLoadError(f"mlp_layer_types {raw['mlp_layer_types']} interleave dense and sparse layers")
    # RoPE rotates only the decoupled rope slice
    return dict(attention_type="mla", mla=mla, moe=moe, head_dim=mla.qk_rope_head_dim, sliding_window=None,
                layer_types=[])


def shard_ranges(rest: str, shape: tuple[int, ...], cfg: ModelConfig, ctx: ParallelContext, idx: int
                 ) -> tuple[int, Ranges] | None:
    part, _, leaf = rest.rpartition(".")
    if part in ("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_b_proj"):
        return 0, even(ctx, shape[0])             # per query head, contiguous
    if part == "self_attn.o_proj" and leaf == "weight":
        return 1, even(ctx, shape[1])
    return None                                   # the latent path, DSA's indexer: replicated


SHARDING = Sharding(shard_ranges, columns=("q_proj", "q_b_proj", "kv_b_proj"), rows=("o_proj",))


def arena_fields(s: Shape) -> dict[str, Any]:
    """MLA at the arena's width, in DeepSeek-V3's proportions: latent = hidden / 2, rope slice = head_dim / 2,
    query rank 3/4."""
    m = Config(q_lora_rank=3 * s.hidden // 4, kv_lora_rank=s.hidden // 2, qk_nope_head_dim=s.head_dim,
               qk_rope_head_dim=s.head_dim // 2, v_head_dim=s.head_dim, rope_interleave=True)
    return dict(attention_type="mla", mla=m, head_dim=m.qk_rope_head_dim)


FAMILY = Family(
    "mla", title="multi-head latent attention", config=Config, field="mla",
    layer_types=("full_attention", "sliding_attention"), build=build, hf_weights=hf_weights, cost=cost,
    readers={"deepseek_v3": deepseek_v3}, sharding=SHARDING, cache_kinds=(CacheKind.LATENT,),
    contestants=(Contestant("mla", arena_fields, "multi-head latent attention"),))
