"""Tensor-parallel forms of the plain layers (Megatron's split): each holds its rank's slice of the weight and
does the one collective its split needs. With a one-process context they compute what the plain layer does.

    ColumnParallelLinear   output features split (QKV, gate/up): no communication; the next layer reads the
                           rank's slice of the activations (its heads, its intermediate channels)
    RowParallelLinear      input features split (o_proj, down_proj, out_proj): partial products, one
                           all-reduce, then the bias once
    VocabParallelEmbedding rows [start, start + V/N) of the table: ids outside give zeros, one all-reduce
    ParallelLMHead         logits of the rank's vocabulary slice, all-gathered (padding cut)

The loader builds the model from the rank's local sizes (models/sharding.py) and then turns the plain
modules into these with `as_parallel`: the parameters stay where they are, so state-dict names do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.distributed import ParallelContext


class ColumnParallelLinear(nn.Linear):
    """y_local = x W_local^T + b_local: the rank's output features; no collective."""
    ctx: ParallelContext


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_local W_local^T, then + b (the full bias, added once after the reduction)."""
    ctx: ParallelContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ctx.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """The rank's rows [vocab_start, vocab_start + num_embeddings) of the table (the last rank's padded)."""
    ctx: ParallelContext
    vocab_start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * mine[..., None].to(self.weight.dtype)
        return self.ctx.all_reduce(out)


class ParallelLMHead(nn.Linear):
    """Logits of the rank's vocabulary slice, gathered on every rank and cut to the real vocabulary."""
    ctx: ParallelContext
    vocab_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_gather_last(F.linear(x, self.weight, self.bias))[..., : self.vocab_size]


class ReducedOutput:
    """A forward hook summing a module's output over ranks (MoE: routed experts + shared experts are partial
    sums over each expert's split intermediate channels; one all-reduce for both)."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce(out)


def as_parallel(module: nn.Module, cls: type[nn.Module], ctx: ParallelContext, **attrs: object) -> nn.Module:
    """Turn a plain nn.Linear / nn.Embedding already holding the rank's slice into `cls` in place."""
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"{cls.__name__} replaces a {cls.__mro__[1].__name__}, got {type(module).__name__}")
    module.__class__ = cls
    module.ctx = ctx
    for k, v in attrs.items():
        setattr(module, k, v)
    return module
