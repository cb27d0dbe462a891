"""Helpers the mechanism families share: reading checkpoint tensors and transformers configs, coercing
configs, the cost model's shape, tensor-parallel slices, the arena's hybrid patterns."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from attnzoo.errors import ModelLoadError
from attnzoo.ops.sparse.cost import CostShape

if TYPE_CHECKING:
    from attnzoo.distributed import ParallelContext
    from attnzoo.mechanisms.registry import Ranges
    from attnzoo.models.config import ModelConfig

ELEM_BYTES = 2  # bf16 caches in the cost columns
Tensors = Mapping[str, torch.Tensor]
C = TypeVar("C")


def take(tensors: Tensors, name: str) -> torch.Tensor:
    if name not in tensors:
        raise ModelLoadError(f"the checkpoint has no tensor {name!r}, which this architecture needs")
    return tensors[name]


def coerce(cls: type[C], value: C | Mapping[str, Any] | None) -> C | None:
    """A family's config from itself or from its JSON form (a dict: native checkpoints, arena results)."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{cls.__module__.rsplit('.', 1)[-1]} parameters must be a mapping, got {value!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__module__.rsplit('.', 1)[-1]} parameters {unknown}; known: {sorted(names)}")
    return cls(**value)


def cost_shape(cfg: ModelConfig, **kw: Any) -> CostShape:
    """The cost model's view of one layer: the model's heads and widths, plus the family's own sizes."""
    return CostShape(cfg.name or cfg.architecture, hidden=cfg.hidden_size, layers=cfg.num_layers,
                     heads=cfg.num_heads, **{"kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                                             "v_head_dim": cfg.head_dim, "bytes_per_elem": ELEM_BYTES, **kw})


def hf_rope(raw: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling or None, partial_rotary_factor) from either transformers 5's `rope_parameters`
    or the older `rope_theta` + `rope_scaling` keys."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    merged = {**legacy, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    partial = float(merged.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    return theta, (None if kind == "default" else {**merged, "rope_type": kind}), partial


def even(ctx: ParallelContext, *segments: int) -> Ranges:
    """Tensor parallelism: the dimension is the concatenation of `segments`, each split evenly; the rank's
    part of each."""
    out, base = [], 0
    for s in segments:
        a, b = ctx.shard(s)
        out.append((base + a, base + b))
        base += s
    return out


def hybrid_pattern(layers: int, ratio: int, other: str, every: str) -> list[str]:
    """`ratio` layers of `other`, then one of `every`, repeated (3:1 on 12 layers: o o o E o o o E ...).
    The pattern must tile the depth, so a 3:1 hybrid needs a multiple of 4 layers, 5:1 of 6."""
    if layers % (ratio + 1):
        raise ValueError(f"a {ratio}:1 hybrid needs a depth that is a multiple of {ratio + 1}; got {layers} layers")
    return [every if (i + 1) % (ratio + 1) == 0 else other for i in range(layers)]
