"""The mechanism registry: one module per attention family (and one for the FFN), each with its typed
config, `from_hf` (its part of a transformers config), `build` (its layer), `hf_weights` (its tensors
renamed from transformers') and `cost` (FLOPs and KV bytes per token). Models look families up here
instead of branching on layer types, so a new mechanism is one module plus one line below.

A layer's mechanism comes from its layer type, refined by the model-wide attention flavour:
    full_attention / sliding_attention   softmax, or mla / dsa when the model's attention is MLA (+ DSA)
    linear_attention                     gdn or kda (the delta rule's kind)
    sparse_attention                     msa
    nsa                                  nsa
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from torch import nn

from attnzoo.mechanisms import delta, dsa, ffn, hyper, latent, msa, nsa, softmax
from attnzoo.mechanisms.common import Tensors

if TYPE_CHECKING:
    import torch

    from attnzoo.models.config import ModelConfig

FAMILIES: dict[str, ModuleType] = {"softmax": softmax, "mla": latent, "dsa": dsa, "msa": msa, "nsa": nsa,
                                   "gdn": delta, "kda": delta}
# layer type -> the ModelConfig field its parameters live in (None: the model's own fields)
LAYER_TYPES: dict[str, str | None] = {"full_attention": None, "sliding_attention": None,
                                      "linear_attention": delta.FIELD, "sparse_attention": msa.FIELD,
                                      "nsa": nsa.FIELD}
# ModelConfig fields holding a family's typed config (dicts in JSON, coerced on construction)
CONFIGS: dict[str, type] = {m.FIELD: m.Config for m in (latent, dsa, msa, nsa, delta, ffn, hyper)}


def mechanism(cfg: ModelConfig, idx: int) -> str:
    """The FAMILIES key of layer idx."""
    t = cfg.layer_types[idx]
    if t == "linear_attention":
        return cfg.linear.kind
    if t == "sparse_attention":
        return "msa"
    if t == "nsa":
        return "nsa"
    return "dsa" if cfg.dsa is not None else "mla" if cfg.mla is not None else "softmax"


def layer_mechanisms(cfg: ModelConfig) -> list[str]:
    return [mechanism(cfg, i) for i in range(cfg.num_layers)]


def build_attention(cfg: ModelConfig, idx: int) -> nn.Module:
    return FAMILIES[mechanism(cfg, idx)].build(cfg, idx)


def build_ffn(cfg: ModelConfig, idx: int) -> nn.Module:
    return ffn.build(cfg, idx)


def attention_hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int
                         ) -> dict[str, torch.Tensor]:
    """Layer idx's attention tensors: transformers' names under src (model.layers.N.) -> ours under dst."""
    return FAMILIES[mechanism(cfg, idx)].hf_weights(cfg, tensors, src, dst, idx)


def layer_cost(cfg: ModelConfig, idx: int, context: int) -> tuple[float, float]:
    """(FLOPs, KV bytes read) of layer idx's attention for the token at position `context` (bf16 caches)."""
    return FAMILIES[mechanism(cfg, idx)].cost(cfg, idx, context)


__all__ = ["CONFIGS", "FAMILIES", "LAYER_TYPES", "attention_hf_weights", "build_attention", "build_ffn",
           "delta", "dsa", "ffn", "hyper", "latent", "layer_cost", "layer_mechanisms", "mechanism", "msa", "nsa",
           "softmax"]
