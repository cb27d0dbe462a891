"""Helpers every mechanism family shares: reading checkpoint tensors, coercing configs, the cost model's
shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from attnzoo.errors import ModelLoadError
from attnzoo.ops.sparse.cost import CostShape

if TYPE_CHECKING:
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
