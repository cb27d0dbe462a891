"""QuantLinear: an nn.Linear whose weight is int4/int8 (ops/quant.py), and quantize_model, which swaps a
model's eligible linears in place (the point where a loader plugs in)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from attnzoo.ops.quant import (
    INT4_GROUPS,
    INT4_ROWS,
    Kind,
    QuantWeight,
    dequantize,
    fit_int4,
    fit_int8,
    pack,
    quant_linear,
)


class QuantLinear(nn.Module):
    """y = x @ w.T + b with w packed. Buffers (packed, scales, bias) carry the state dict; the scales' dtype
    is the compute dtype, so module.to(torch.bfloat16) switches it (the integer codes stay as they are)."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.kind, self.group_size, self.native = qw.kind, qw.group_size, qw.native
        self.in_features, self.out_features = qw.K, qw.N
        self.register_buffer("packed", qw.packed)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("bias", None if bias is None else bias.detach().to(qw.dtype).clone())

    @property
    def qweight(self) -> QuantWeight:
        return QuantWeight(self.kind, self.packed, self.scales, self.group_size, self.out_features,
                           self.in_features, self.native)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: Kind = "int4", group_size: int = 32,
                    dtype: torch.dtype | None = None) -> QuantLinear:
        """Quantise a float linear (int4: asymmetric per group; int8: symmetric per row); computes in the
        linear's dtype unless told."""
        w = linear.weight.detach()
        blocks = fit_int4(w, group_size) if kind == "int4" else fit_int8(w)
        return cls(pack(blocks, kind, dtype or w.dtype), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"group_size={self.group_size}, dtype={self.scales.dtype}, bias={self.bias is not None}")


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The reference for a quantised model: a copy whose every QuantLinear is an nn.Linear holding exactly
    the weight it stands for (codes x scales as stored), computing in `dtype` like the rest of the copy."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float32)
            with torch.no_grad():
                lin.weight.copy_(dequantize(m.qweight))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    model.quantization = None
    return model.to(dtype)


def quantizable(linear: nn.Linear, kind: Kind, group_size: int = 32) -> bool:
    if kind == "int8":
        return True
    return (group_size in INT4_GROUPS and linear.in_features % group_size == 0
            and linear.out_features % INT4_ROWS == 0)


def quantize_model(model: nn.Module, kind: Kind = "int4", group_size: int = 32, skip: Iterable[str] = (),
                   overrides: Mapping[str, Kind | None] | None = None,
                   dtype: torch.dtype | None = None) -> dict[str, Kind]:
    """Replace every eligible nn.Linear by a QuantLinear in place; returns {name: kind} of those replaced.
    A linear whose qualified name ends with an entry of `skip` stays float; `overrides` maps name suffixes
    to another kind (None: skip). Embeddings are not linears and stay. The default `overrides` puts the
    lm_head in int8: measured on SmolLM2 (bench/quant_cpu.py), an int4 lm_head changes greedy tokens much
    more than int4 elsewhere, while int8 costs about what int4 does (its GGUF stores the tied embedding
    as Q8_0). Compute dtype: each linear's own unless `dtype`; the kernels are fast with bf16 activations
    only (fp32 ones take a slow path, several times slower than an fp32 F.linear)."""
    skip = tuple(skip)
    overrides = {"lm_head": "int8"} if overrides is None else dict(overrides)
    done: dict[str, Kind] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or (skip and name.endswith(skip)):
            continue
        k = next((v for suffix, v in overrides.items() if name.endswith(suffix)), kind)
        if k is None or not quantizable(m, k, group_size):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                QuantLinear.from_linear(m, k, group_size, dtype))
        done[name] = k
    return done
