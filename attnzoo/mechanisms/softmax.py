"""Softmax attention over every earlier key (full_attention) or the last `sliding_window` (sliding_attention):
MHA / GQA / MQA, with the options of the models that use it (qk-norm, output gate, sinks, value heads of
another width). Its sizes are ModelConfig's own fields (heads, head_dim, sliding_window...), so it has no
config of its own; it serves full/sliding layers unless a configured family (MLA, DSA) claims them.

Architectures read here: llama, mistral, qwen3, cohere2, mimo_v2_flash (the plain and SWA/global models).
Tensor parallelism: query heads split (q_proj rows, o_proj columns, sinks); KV heads split when N divides
them, else replicated: N must then be a multiple of the KV heads and rank r keeps KV head r * Hkv // N (the
one its query heads read); q/k norms replicated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from attnzoo.layers import Attention
from attnzoo.layers.cache_spec import CacheKind
from attnzoo.mechanisms import ffn
from attnzoo.mechanisms.common import Tensors, cost_shape, even, hybrid_pattern, take
from attnzoo.mechanisms.registry import Contestant, Family, Ranges, Sharding
from attnzoo.ops.sparse import cost as cost_model

if TYPE_CHECKING:
    from attnzoo.arena.mechanisms import Shape
    from attnzoo.distributed import ParallelContext
    from attnzoo.models.config import ModelConfig


def kv_heads(cfg: ModelConfig, idx: int) -> int:
    """Layer idx's KV heads (MiMo's sliding layers have twice the global ones)."""
    sliding = cfg.layer_types[idx] == "sliding_attention"
    return cfg.sliding_num_kv_heads if sliding and cfg.sliding_num_kv_heads else cfg.num_kv_heads


def build(cfg: ModelConfig, idx: int) -> Attention:
    sliding = cfg.layer_types[idx] == "sliding_attention"
    return Attention(idx, cfg.hidden_size, cfg.num_heads, kv_heads(cfg, idx), cfg.head_dim, bias=cfg.attention_bias,
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
    c = cost_model.cost_per_token(cost_model.gqa_terms, min(context, cfg.sliding_window) if sliding else context,
                                  cost_shape(cfg))
    return c.flops(cost_model.LAYER), c.kv_bytes


# ---- transformers configs --------------------------------------------------------------------------------
def qwen3(raw: dict[str, Any]) -> dict[str, Any]:
    """qk-norm; sliding only with use_sliding_window, and then (as transformers' Qwen3Config) only on
    layers >= max_window_layers unless layer_types says otherwise."""
    if not raw.get("use_sliding_window", False):
        return dict(qk_norm=True, sliding_window=None, layer_types=[])
    types = raw.get("layer_types")
    if raw.get("sliding_window") and not types:
        first = raw.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(raw["num_hidden_layers"])]
    window = raw.get("sliding_window") if types and "sliding_attention" in types else None
    return dict(qk_norm=True, sliding_window=window, layer_types=list(types or []))


def cohere2(raw: dict[str, Any]) -> dict[str, Any]:
    """3 sliding (interleaved RoPE) : 1 global (NoPE); parallel block; LayerNorm; scaled logits."""
    every = raw.get("sliding_window_pattern", 4)
    types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(raw["num_hidden_layers"])]
    return dict(layer_types=types, sliding_window=raw.get("sliding_window"), layer_rope={"full_attention": None},
                rope_interleaved=True, norm="layer", parallel_block=True,
                logit_scale=float(raw.get("logit_scale", 0.0625)), rms_norm_eps=raw.get("layer_norm_eps", 1e-5),
                tie_word_embeddings=raw.get("tie_word_embeddings", True))


def mimo_v2_flash(raw: dict[str, Any]) -> dict[str, Any]:
    """MiMo-V2-Flash: global at layer 0 and every 6th, sliding elsewhere with twice the KV heads and sink
    logits; q/k head_dim != v_head_dim; values scaled; RoPE theta (and partial factor) per layer type;
    DeepSeek-style routing without shared experts."""
    n = raw["num_hidden_layers"]
    rp = raw.get("rope_parameters") or {}
    layer_rope = {}
    for t in ("full_attention", "sliding_attention"):
        r = rp.get(t, rp)
        layer_rope[t] = dict(theta=float(r.get("rope_theta", raw.get("rope_theta", 10000.0))),
                             partial=float(r.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))),
                             scaling=None if r.get("rope_type", "default") == "default" else dict(r))
    moe = ffn.mimo_moe(raw)
    return dict(
        layer_types=raw.get("layer_types") or [
            "full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)],
        # the reference attends sliding_window_size previous tokens plus the query (transformers adds the 1)
        sliding_window=raw["sliding_window_size"] + 1 if raw.get("sliding_window_size") else raw.get("sliding_window"),
        layer_rope=layer_rope, sliding_num_kv_heads=2 * raw["num_key_value_heads"], v_head_dim=raw.get("v_head_dim"),
        sliding_sinks=True, value_scale=float(raw.get("attention_value_scale") or 1.0), moe=moe,
        mlp_layer_types=raw.get("mlp_layer_types") or ["dense"] + ["sparse" if moe is not None else "dense"] * (n - 1))


# ---- tensor parallelism ------------------------------------------------------------------------------------
def kv_rows(ctx: ParallelContext, heads: int, rows: int) -> Ranges:
    """K/V projection rows: the rank's heads, or the one replicated head its query heads read."""
    if heads % ctx.world_size == 0:
        return even(ctx, rows)
    head, width = ctx.rank * heads // ctx.world_size, rows // heads
    return [(head * width, (head + 1) * width)]


def shard_ranges(rest: str, shape: tuple[int, ...], cfg: ModelConfig, ctx: ParallelContext, idx: int
                 ) -> tuple[int, Ranges] | None:
    part, _, leaf = rest.rpartition(".")
    if rest == "self_attn.attention_sink_bias" or part == "self_attn.q_proj":
        return 0, even(ctx, shape[0])             # per query head, contiguous
    if part in ("self_attn.k_proj", "self_attn.v_proj"):
        return 0, kv_rows(ctx, kv_heads(cfg, idx), shape[0])
    if part == "self_attn.o_proj" and leaf == "weight":
        return 1, even(ctx, shape[1])
    return None                                   # q/k norms: replicated


def shard_problems(cfg: ModelConfig, layers: list[int], n: int) -> list[str]:
    return [f"num_key_value_heads {h} (N must divide it or be a multiple of it)"
            for h in sorted({kv_heads(cfg, i) for i in layers}) if h % n and n % h]


# ---- the arena ----------------------------------------------------------------------------------------------
def _swa(s: Shape, types: list[str]) -> dict[str, Any]:
    return dict(num_kv_heads=s.kv_heads, sliding_window=s.window, layer_types=types)


FAMILY = Family(
    "softmax", title="softmax attention", layer_types=("full_attention", "sliding_attention"),
    build=build, hf_weights=hf_weights, cost=cost, cache_kinds=(CacheKind.KV,),
    readers={"llama": lambda raw: {}, "mistral": lambda raw: {}, "qwen3": qwen3, "cohere2": cohere2,
             "mimo_v2_flash": mimo_v2_flash},
    sharding=Sharding(shard_ranges, columns=("qkv_proj",), rows=("o_proj",), problems=shard_problems),
    contestants=(
        Contestant("mha", lambda s: {}, "multi-head attention"),
        Contestant("mqa", lambda s: dict(num_kv_heads=1), "multi-query attention (1 KV head)"),
        Contestant("gqa", lambda s: dict(num_kv_heads=s.kv_heads), "grouped-query attention"),
        Contestant("swa", lambda s: _swa(s, ["sliding_attention"] * s.layers), "sliding-window attention (GQA)"),
        Contestant("swa_hybrid_3_1", lambda s: _swa(s, hybrid_pattern(s.layers, 3, "sliding_attention",
                                                                      "full_attention")), "SWA:global 3:1"),
        Contestant("swa_hybrid_5_1", lambda s: _swa(s, hybrid_pattern(s.layers, 5, "sliding_attention",
                                                                      "full_attention")), "SWA:global 5:1")))
