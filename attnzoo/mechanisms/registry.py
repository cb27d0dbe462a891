"""The registry of mechanism families: each family module declares one `Family` (what it contributes) and
`register` adds it; every table the rest of attnzoo reads (layer types, config types, transformers readers,
tensor-parallel rules, distillation hooks, arena contestants) is derived from the registered families.

A layer's family: among the families serving its layer type, those that apply to the model (a family with
a config applies when the model sets it; one without is the default), a family that refines another
winning over it (DSA over MLA), a configured family over the default (MLA over softmax). A family with
several mechanisms (the delta rule: gdn, kda) says which one a layer is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from attnzoo.arena.mechanisms import Shape
    from attnzoo.distributed import ParallelContext
    from attnzoo.layers.cache_spec import CacheKind
    from attnzoo.mechanisms.common import Tensors
    from attnzoo.models.config import ModelConfig

Ranges = list[tuple[int, int]]
Reader = Callable[[dict[str, Any]], dict[str, Any]]   # transformers config.json -> ModelConfig fields


@dataclass(frozen=True)
class Sharding:
    """How tensor parallelism splits a family's layers over N ranks (models/sharding.py applies it)."""
    # (tensor name inside the layer, e.g. "self_attn.q_proj.weight", its shape, cfg, ctx, layer index) ->
    # (dimension, the rank's ranges along it), or None: replicated
    ranges: Callable[[str, tuple[int, ...], ModelConfig, ParallelContext, int], tuple[int, Ranges] | None]
    columns: tuple[str, ...] = ()   # the built layer's linears split by output features (no collective)
    rows: tuple[str, ...] = ()      # ... split by input features (one all-reduce)
    problems: Callable[[ModelConfig, list[int], int], list[str]] | None = None  # (cfg, its layers, N): sizes N
    #                                                                              must divide
    local: Callable[[Any, int], Any] | None = None   # (the family's config, N) -> what a rank builds with
    refuse: Callable[[ModelConfig], str | None] | None = None   # what of the family's models cannot split
    parallelize: Callable[[nn.Module, ParallelContext], None] | None = None   # instead of columns / rows


@dataclass(frozen=True)
class Distill:
    """An index branch the LM loss cannot reach (top-k has no gradient), trained by distillation from its
    layer's attention (arena/distill.py)."""
    has_branch: Callable[[nn.Module], bool]   # does this built layer own one (IndexShare's shared layers do not)
    # (layer, its detached input [n, D], rope or None, cu_seqlens as a list) -> the KL summed over queries / n
    loss: Callable[[nn.Module, torch.Tensor, Any, list[int]], torch.Tensor]


@dataclass(frozen=True)
class Contestant:
    """One arena contestant: the ModelConfig fields it sets on top of the shared Shape."""
    name: str
    fields: Callable[[Shape], dict[str, Any]]
    description: str


@dataclass(frozen=True)
class Family:
    """What one mechanism family contributes. Only `name` is required: a family without layer types
    (the FFN, mHC streams) contributes a config and readers."""
    name: str
    title: str = ""                            # what messages call it
    config: type | None = None                 # its parameters (a dataclass; JSON dicts coerced to it)
    field: str | None = None                   # where a ModelConfig keeps them (None: the model's own fields)
    layer_types: tuple[str, ...] = ()          # the layer types it serves
    mechanisms: tuple[str, ...] = ()           # the names its layers go by (default: its name)
    kind: Callable[[ModelConfig, int], str] | None = None   # which mechanism layer idx is, when several
    refines: str | None = None                 # a family on the same layer types this one wins over
    check: Callable[[ModelConfig], None] | None = None      # cross-field checks once its config is set
    build: Callable[[ModelConfig, int], nn.Module] | None = None
    # (cfg, transformers tensors, src "model.layers.N.", dst "layers.N.attn.", idx) -> our tensors
    hf_weights: Callable[[ModelConfig, Tensors, str, str, int], dict[str, torch.Tensor]] | None = None
    cost: Callable[[ModelConfig, int, int], tuple[float, float]] | None = None   # (FLOPs, bytes read) / token
    readers: Mapping[str, Reader] = dataclasses.field(default_factory=dict)   # transformers model_type -> its fields
    sharding: Sharding | None = None           # None: tensor parallelism refuses the family
    distill: Distill | None = None
    cache_kinds: tuple[CacheKind, ...] = ()    # the cache kinds its layers declare
    contestants: tuple[Contestant, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.mechanisms or ((self.name,) if self.layer_types else ())

    def mechanism(self, cfg: ModelConfig, idx: int) -> str:
        return self.kind(cfg, idx) if self.kind is not None else self.name

    def applies(self, cfg: ModelConfig) -> bool:
        return self.field is None or getattr(cfg, self.field) is not None


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; its names, layer types' claims, readers, config field and contestants must be new."""
    if family.name in _FAMILIES:
        raise ValueError(f"a mechanism family named {family.name!r} is registered already")
    if (family.config is None) != (family.field is None):
        raise ValueError(f"family {family.name!r}: a config and the field that holds it go together")
    if family.layer_types and family.build is None:
        raise ValueError(f"family {family.name!r} serves layer types but builds no layer")
    for what, ours, theirs in (("mechanism", family.names, lambda f: f.names),
                               ("transformers model_type", tuple(family.readers), lambda f: tuple(f.readers)),
                               ("config field", (family.field,) if family.field else (), lambda f: (f.field,)),
                               ("arena contestant", tuple(c.name for c in family.contestants),
                                lambda f: tuple(c.name for c in f.contestants))):
        for other in _FAMILIES.values():
            if taken := sorted(set(ours) & set(theirs(other))):
                raise ValueError(f"{what} {', '.join(taken)} of {family.name!r} belongs to {other.name!r}")
    if family.refines is not None and family.refines not in _FAMILIES:
        raise ValueError(f"family {family.name!r} refines {family.refines!r}, which is not registered")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    del _FAMILIES[name]


# ---- tables derived from the registered families ------------------------------------------------------
def families() -> list[Family]:
    return list(_FAMILIES.values())


def family(name: str) -> Family:
    return _FAMILIES[name]


def by_mechanism() -> dict[str, Family]:
    """Mechanism name (softmax, mla, gdn, kda, ...) -> its family."""
    return {m: f for f in _FAMILIES.values() for m in f.names}


def layer_types() -> dict[str, list[Family]]:
    """Layer type -> the families serving it, in registration order."""
    out: dict[str, list[Family]] = {}
    for f in _FAMILIES.values():
        for t in f.layer_types:
            out.setdefault(t, []).append(f)
    return out


def config_types() -> dict[str, type]:
    """ModelConfig field -> the config type kept there."""
    return {f.field: f.config for f in _FAMILIES.values() if f.field is not None}


def hf_readers() -> dict[str, Reader]:
    return {t: r for f in _FAMILIES.values() for t, r in f.readers.items()}


def contestants() -> dict[str, Contestant]:
    return {c.name: c for f in _FAMILIES.values() for c in f.contestants}


# ---- per layer -----------------------------------------------------------------------------------------
def family_for(cfg: ModelConfig, layer_type: str) -> Family:
    """The family serving layers of `layer_type` in this model (see the module docstring)."""
    serving = layer_types().get(layer_type)
    if not serving:
        raise ValueError(f"unsupported layer type {layer_type!r}; supported: {', '.join(layer_types())}")
    candidates = [f for f in serving if f.applies(cfg)]
    refined = {f.refines for f in candidates}
    candidates = [f for f in candidates if f.name not in refined]
    configured = [f for f in candidates if f.field is not None]
    candidates = configured or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        need = " or ".join(f.field for f in serving if f.field)
        raise ValueError(f"{layer_type} layers need the {need} parameters")
    raise ValueError(f"{layer_type} layers: families {', '.join(f.name for f in candidates)} each claim them; "
                     f"set the config of one")


def family_of(cfg: ModelConfig, idx: int) -> Family:
    return family_for(cfg, cfg.layer_types[idx])


def mechanism(cfg: ModelConfig, idx: int) -> str:
    """The mechanism of layer idx (softmax, mla, dsa, msa, nsa, gdn, kda, or a registered family's)."""
    return family_of(cfg, idx).mechanism(cfg, idx)


def layer_mechanisms(cfg: ModelConfig) -> list[str]:
    return [mechanism(cfg, i) for i in range(cfg.num_layers)]


def build_attention(cfg: ModelConfig, idx: int) -> nn.Module:
    return family_of(cfg, idx).build(cfg, idx)


def attention_hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int
                         ) -> dict[str, torch.Tensor]:
    """Layer idx's attention tensors: transformers' names under src (model.layers.N.) -> ours under dst."""
    return family_of(cfg, idx).hf_weights(cfg, tensors, src, dst, idx)


def layer_cost(cfg: ModelConfig, idx: int, context: int) -> tuple[float, float]:
    """(FLOPs, KV bytes read) of layer idx's attention for the token at position `context` (bf16 caches)."""
    return family_of(cfg, idx).cost(cfg, idx, context)


def check(cfg: ModelConfig) -> None:
    """Every layer has a family, and each family whose config is set accepts the model."""
    for t in dict.fromkeys(cfg.layer_types):
        family_for(cfg, t)
    for f in _FAMILIES.values():
        if f.check is not None and f.field is not None and getattr(cfg, f.field) is not None:
            f.check(cfg)
