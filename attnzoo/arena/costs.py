"""What a contestant costs per token, summed over its layers: attention FLOPs and KV bytes read per decoded
token (each layer's mechanism prices itself: `attnzoo.mechanisms.layer_cost`, on the shared cost model
`attnzoo.ops.sparse.cost` where it covers the mechanism), and cache bytes stored per token (the layers' own
cache specs). The FFN is left out (it is the same in every contestant); decode mode: the token at position
`context`.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import torch

from attnzoo.layers.cache_spec import CacheSpec
from attnzoo.mechanisms import layer_cost
from attnzoo.mechanisms.common import ELEM_BYTES
from attnzoo.models.config import ModelConfig
from attnzoo.models.weights import model_class


def attention_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """FLOPs of the attention layers (core + projections, all layers) for the token at position `context`."""
    return sum(layer_cost(cfg, i, context)[0] for i in range(cfg.num_layers))


def kv_read_bytes_per_token(cfg: ModelConfig, context: int) -> float:
    """Cache bytes one decoded token reads at position `context`, all layers (bf16; recurrent state float32)."""
    return sum(layer_cost(cfg, i, context)[1] for i in range(cfg.num_layers))


@lru_cache(maxsize=64)
def _specs(cfg_json: str) -> list[CacheSpec | tuple[CacheSpec, ...]]:
    cfg = ModelConfig(**json.loads(cfg_json))
    with torch.device("meta"):
        return model_class(cfg)(cfg).cache_specs()


def kv_bytes_per_token(cfg: ModelConfig, context: int) -> float:
    """Cache bytes stored per token for a sequence of `context` tokens, all layers (bf16): per-token caches
    in full, sliding ones only for their window, recurrent states once per sequence (so / context)."""
    specs = _specs(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    total = 0.0
    for spec in specs:
        for s in spec if isinstance(spec, tuple) else (spec,):
            per = s.bytes_per_token(ELEM_BYTES)
            window = s.window
            total += per * (min(context, window) if window else context)
            if hasattr(s, "bytes_per_sequence"):
                total += s.bytes_per_sequence(ELEM_BYTES)
    return total / context
