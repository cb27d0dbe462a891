"""QuantLinear: an nn.Linear whose weight is int4/int8 or GGUF blocks (q4_0/q4_1/q8_0; ops/quant.py), and
quantize_model, which swaps a model's eligible linears in place (the point where a loader plugs in)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from attnzoo.ops.quant import (
    INT4_GROUPS,
    INT4_ROWS,
    Q_KINDS,
    Kind,
    QuantWeight,
    dequantize,
    fit_int4,
    fit_int8,
    fit_q8_0,
    pack,
    quant_linear,
)
from attnzoo.ops.quant_kernels import FMTS


class QuantLinear(nn.Module):
    """y = x @ w.T + b with w packed. Buffers (packed, scales, bias) carry the state dict. int4/int8: the
    scales' dtype is the compute dtype, so module.to(torch.bfloat16) switches it (the integer codes stay as
    they are). q kinds compute in fp32 from fp32 or bf16 activations; their scales are integer bits that
    .to() leaves alone."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.kind, self.group_size, self.native = qw.kind, qw.group_size, qw.native
        self.fmt = FMTS[qw.kind] if qw.kind in Q_KINDS and qw.native else None  # the C++ op's, when it runs
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
        """Quantise a float linear (int4: asymmetric per group; int8: symmetric per row; q4_1 and q8_0: GGUF's
        blocks of 32); int4/int8 compute in the linear's dtype unless told."""
        w = linear.weight.detach()
        if kind in ("int4", "q4_1"):
            blocks = fit_int4(w, group_size if kind == "int4" else 32)
        else:  # (q4_0 holds GGUF's own blocks only: pack refuses it)
            blocks = fit_q8_0(w) if kind == "q8_0" else fit_int8(w)
        return cls(pack(blocks, kind, dtype or w.dtype), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt is not None and x.dtype in (torch.float32, torch.bfloat16):  # decode's hot path: ~4 us a call
            return torch.ops.attnzoo.q_linear(x, self.packed, self.scales, self.fmt, self.out_features,
                                              self.in_features, self.bias)
        return quant_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"group_size={self.group_size}, dtype={self.qweight.dtype}, bias={self.bias is not None}")


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
    if kind in Q_KINDS:
        return linear.in_features % 32 == 0
    return (group_size in INT4_GROUPS and linear.in_features % group_size == 0
            and linear.out_features % INT4_ROWS == 0)


def quantize_model(model: nn.Module, kind: Kind = "int4", group_size: int = 32, skip: Iterable[str] = (),
                   overrides: Mapping[str, Kind | None] | None = None,
                   dtype: torch.dtype | None = None) -> dict[str, Kind]:
    """Replace every eligible nn.Linear by a QuantLinear in place; returns {name: kind} of those replaced.
    A linear whose qualified name ends with an entry of `skip` stays float; `overrides` maps name suffixes
    to another kind (None: skip). Embeddings are not linears and stay. The default `overrides` puts the
    lm_head in int8 (q8_0 for the q kinds): measured on SmolLM2 (bench/quant_cpu.py), an int4 lm_head changes
    greedy tokens much more than int4 elsewhere, while int8 costs about what int4 does (its GGUF stores the
    tied embedding as Q8_0). Compute dtype (int4/int8): each linear's own unless `dtype`; torch's kernels are
    fast with bf16 activations only (fp32 ones take a slow path, several times slower than an fp32 F.linear).
    The q kinds are fast from either (the C++ kernel; pick q4_1 over q4_0 for float weights)."""
    skip = tuple(skip)
    if overrides is None:
        overrides = {"lm_head": "q8_0" if kind in Q_KINDS else "int8"}
    overrides = dict(overrides)
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
