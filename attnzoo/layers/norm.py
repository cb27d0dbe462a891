from __future__ import annotations

import torch
from torch import nn


class _Norm(nn.Module):
    """A weight per channel (ones at init) and x / sqrt(mean(x^2) + eps), statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _rms_normalize(self, x32: torch.Tensor) -> torch.Tensor:
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)


class RMSNorm(_Norm):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in float32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self._rms_normalize(x.to(torch.float32)).to(x.dtype)


class LayerNorm(_Norm):
    """Mean-centred LayerNorm with a weight and no bias, statistics in float32 (Cohere's)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        return (self.weight.to(torch.float32) * self._rms_normalize(x32 - x32.mean(-1, keepdim=True))).to(x.dtype)
