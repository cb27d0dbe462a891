from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ClampedGLU:
    """GPT-OSS / MiniMax-M3 gating: gate clamped above, up clamped both ways, gate * sigmoid(alpha * gate)
    times (up + up_offset). GLM-5.3-Flash's clamped SwiGLU silu(gate) * up is alpha 1, up_offset 0."""
    alpha: float
    limit: float
    up_offset: float = 1.0


def glu(gate: torch.Tensor, up: torch.Tensor, clamp: ClampedGLU | None = None) -> torch.Tensor:
    if clamp is None:
        return F.silu(gate) * up
    gate = gate.clamp(max=clamp.limit)
    up = up.clamp(min=-clamp.limit, max=clamp.limit)
    return (up + clamp.up_offset) * (gate * torch.sigmoid(gate * clamp.alpha))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (or the clamped variant); gate and up fused into one matmul (one weight
    read per step)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, clamp: ClampedGLU | None = None):
        super().__init__()
        self.intermediate_size, self.clamp = intermediate_size, clamp
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(glu(gate, up, self.clamp))
