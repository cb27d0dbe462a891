from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.ops.rope import rope_cos_sin, rope_frequencies


class RotaryEmbedding(nn.Module):
    """cos/sin lookup for absolute positions; the table grows on demand (no fixed maximum)."""

    def __init__(self, rotary_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                 max_position_embeddings: int | None = None, interleaved: bool = False):
        super().__init__()
        self.rotary_dim, self.interleaved = rotary_dim, interleaved
        self.inv_freq, self.attention_factor = rope_frequencies(rotary_dim, theta, scaling, max_position_embeddings)
        self._cos = self._sin = torch.empty(0, rotary_dim // 2)
        self._grow(max_position_embeddings or 4096)

    def _grow(self, n: int) -> None:
        self._cos, self._sin = rope_cos_sin(torch.arange(n), self.inv_freq, self.attention_factor)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a compiled step reads the table as traced (the engine grows it before compiling: `covers`)
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= self._cos.shape[0]:
            self._grow(2 * int(positions.max()) + 1)
        if self._cos.device != positions.device:
            self._cos, self._sin = self._cos.to(positions.device), self._sin.to(positions.device)
        return self._cos[positions], self._sin[positions]
