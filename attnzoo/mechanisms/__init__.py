"""The mechanism families: one module per family, each declaring one `Family` (registry.py) with its typed
config, the transformers architectures it reads, `build` (its layer), `hf_weights` (its tensors renamed
from transformers'), `cost` (FLOPs and KV bytes per token), its tensor-parallel rules, distillation hook and
arena contestants. The built-in families register below through `register`, the one call a new family
needs (from anywhere: tests/mechanisms/test_plugin.py registers one from a test file); the models, loaders,
sharding and the arena read the registry, never a family by name.

Built in, by layer type:
    full_attention / sliding_attention   softmax, or mla / dsa when the model sets their configs
    linear_attention                     delta_rule: gdn or kda (its config's kind)
    sparse_attention                     msa
    nsa                                  nsa
and, without layer types, ffn (the MLP; config `moe`) and hyper (mHC streams).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnzoo.mechanisms import delta_rule, dsa, ffn, hyper, latent, msa, nsa, softmax
from attnzoo.mechanisms.registry import (Contestant, Distill, Family, Sharding, attention_hf_weights, build_attention,
                                         by_mechanism, config_types, contestants, families, family, family_of,
                                         hf_readers, layer_cost, layer_mechanisms, layer_types, mechanism, register,
                                         unregister)

if TYPE_CHECKING:
    from torch import nn

    from attnzoo.models.config import ModelConfig

# registration order is the arena's contestant order; a family that refines another comes after it
for _module in (softmax, latent, delta_rule, nsa, dsa, msa, ffn, hyper):
    register(_module.FAMILY)


def build_ffn(cfg: ModelConfig, idx: int) -> nn.Module:
    return ffn.build(cfg, idx)


__all__ = ["Contestant", "Distill", "Family", "Sharding", "attention_hf_weights", "build_attention", "build_ffn",
           "by_mechanism", "config_types", "contestants", "delta_rule", "dsa", "families", "family", "family_of",
           "ffn", "hf_readers", "hyper", "latent", "layer_cost", "layer_mechanisms", "layer_types", "mechanism",
           "msa", "nsa", "register", "softmax", "unregister"]
