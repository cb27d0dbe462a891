"""What a contestant costs per token, summed over its layers: attention FLOPs and KV bytes read per decoded
token (the cost model, `attnzoo.ops.sparse.cost`, for GQA/MLA/DSA/MSA/NSA layers; here for the two kinds it
does not cover), and cache bytes stored per token (the layers' own cache specs).

Sliding-window layers cost a GQA layer at context min(context, window). Delta-rule layers (GDN, KDA) cost
the same at every context, per token and layer:
    projections  2 * D * (in_proj width) + 2 * Hv * dv * D   (+ KDA's low-rank gate 2 * 2 * dk * H * dk)
    conv         2 * conv_dim * K
    state        7 * Hv * dk * dv   (decay S *= g: 1, S^T k: 2, rank-1 update: 2, read-out S^T q: 2)
and read their float32 state plus the conv's last K-1 inputs (bf16). The FFN is left out (it is the same in
every contestant); decode mode: the token at position `context`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from attnzoo.models.config import ModelConfig
from attnzoo.ops.sparse import cost

ELEM_BYTES = 2  # bf16 caches


def layer_kinds(cfg: ModelConfig) -> list[str]:
    """Per layer: gqa | swa | linear | mla | dsa | msa | nsa (the cost model's names where it has them)."""
    out = []
    for t in cfg.layer_types:
        if t == "sliding_attention":
            out.append("swa")
        elif t == "linear_attention":
            out.append("linear")
        elif t == "sparse_attention":
            out.append("msa")
        elif t == "nsa":
            out.append("nsa")
        elif cfg.mla is not None:
            out.append("dsa" if cfg.dsa is not None else "mla")
        else:
            out.append("gqa")
    return out


def cost_config(cfg: ModelConfig) -> cost.ModelConfig:
    m, d, s, n = cfg.mla or {}, cfg.dsa or {}, cfg.msa or {}, cfg.nsa or {}
    return cost.ModelConfig(
        cfg.name or cfg.architecture, hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_heads,
        kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, v_head_dim=m.get("v_head_dim", cfg.head_dim),
        q_lora_rank=m.get("q_lora_rank") or 0, kv_lora_rank=m.get("kv_lora_rank", 0),
        qk_nope_head_dim=m.get("qk_nope_head_dim", 0), qk_rope_head_dim=m.get("qk_rope_head_dim", 0),
        index_heads=d.get("index_n_heads", cfg.num_kv_heads if s else 0),
        index_dim=d.get("index_head_dim", s.get("index_head_dim", 0)), index_topk=d.get("index_topk", 0),
        index_block=s.get("block_size", 0), index_topk_blocks=s.get("topk_blocks", 0),
        nsa_l=n.get("block_len", 0), nsa_d=n.get("stride", 0), nsa_l_sel=n.get("select_block", 0),
        nsa_n=n.get("num_selected", 0), nsa_w=n.get("window") or 0, bytes_per_elem=ELEM_BYTES)


def linear_layer_cost(cfg: ModelConfig) -> tuple[float, float]:
    """(FLOPs, bytes read) of one delta-rule layer for one token; see the module docstring."""
    lin, D = cfg.linear, cfg.hidden_size
    Hk, Hv, dk, dv, K = lin["num_k_heads"], lin["num_v_heads"], lin["k_dim"], lin["v_dim"], lin["conv_width"]
    conv_dim = 2 * Hk * dk + Hv * dv
    if lin["kind"] == "gdn":
        proj = 2 * D * (conv_dim + Hv * dv + 2 * Hv) + 2 * Hv * dv * D
    else:
        proj = 2 * D * (conv_dim + Hv + 2 * dk) + 2 * 2 * dk * Hv * dk + 2 * Hv * dv * D
    flops = proj + 2 * conv_dim * K + 7 * Hv * dk * dv
    return float(flops), float(Hv * dk * dv * 4 + conv_dim * (K - 1) * ELEM_BYTES)


def _layer(kind: str, context: int, cfg: ModelConfig, cc: cost.ModelConfig) -> tuple[float, float]:
    if kind == "linear":
        return linear_layer_cost(cfg)
    mech, p = ("gqa", min(context, cfg.sliding_window)) if kind == "swa" else (kind, context)
    c = cost.cost_per_token(mech, p, cc)
    return c.flops(cost.LAYER), c.kv_bytes


def attention_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """FLOPs of the attention layers (core + projections, all layers) for the token at position `context`."""
    cc = cost_config(cfg)
    return sum(_layer(k, context, cfg, cc)[0] for k in layer_kinds(cfg))


def kv_read_bytes_per_token(cfg: ModelConfig, context: int) -> float:
    """Cache bytes one decoded token reads at position `context`, all layers (bf16; recurrent state float32)."""
    cc = cost_config(cfg)
    return sum(_layer(k, context, cfg, cc)[1] for k in layer_kinds(cfg))


@lru_cache(maxsize=64)
def _specs(cfg_json: str):
    import json

    from attnzoo.models.decoder import DecoderLM
    cfg = ModelConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        return DecoderLM(cfg).cache_specs()


def kv_bytes_per_token(cfg: ModelConfig, context: int) -> float:
    """Cache bytes stored per token for a sequence of `context` tokens, all layers (bf16): per-token caches
    in full, sliding ones only for their window, recurrent states once per sequence (so / context)."""
    import dataclasses
    import json
    specs = _specs(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    total = 0.0
    for spec in specs:
        for s in spec if isinstance(spec, tuple) else (spec,):
            per = s.bytes_per_token(ELEM_BYTES)
            window = getattr(s, "window", 0)
            total += per * (min(context, window) if window else context)
            if hasattr(s, "bytes_per_sequence"):
                total += s.bytes_per_sequence(ELEM_BYTES)
    return total / context
