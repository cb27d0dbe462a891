"""QuantLinear: an nn.Linear whose weight is int4/int8 (ops/quant.py), and quantize_model, which swaps a
model's eligible linears in place (the point where a loader plugs in)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from attnzoo.ops.quant import INT4_GROUPS, INT4_ROWS, Kind, QuantWeight, fit_int4, fit_int8, pack, quant_linear


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


def quantizable(linear: nn.Linear, kind: Kind, group_size: int = 32) -> bool:
    if kind == "int8":
        return True
    return (group_size in INT4_GROUPS and linear.in_features % group_size == 0
            and linear.out_features % INT4_ROWS == 0)


def quantize_model(model: nn.Module, kind: Kind = "int4", group_size: int = 32,
                   skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear whose qualified name does not end with a name in `skip` (and whose shape the
    kernel takes) by a QuantLinear, in place; returns the names replaced. Embeddings are not linears and
    stay. The lm_head is skipped by default: in SmolLM2 it is tied to the embedding, so quantising it adds a
    copy, and its 4-bit error moves the logits most (bench/quant_cpu.py measures both)."""
    skip = tuple(skip)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not (skip and name.endswith(skip)) and quantizable(m, kind, group_size)]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                QuantLinear.from_linear(linear, kind, group_size))
    return [name for name, _ in targets]
