"""Rotary position embeddings: frequency tables (with the scaling variants our loaders meet) and rotation.

Conventions (docs/mechanisms/softmax.md §2): `inv_freq[i] = theta ** (-2i / r)` for the `r` rotated dims;
half-split pairs (x[i], x[i + r/2]) as in Llama/NeoX, interleaved pairs (x[2i], x[2i+1]) as in GPT-J;
partial rotary rotates only the first `r` dims of the head.
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(rotary_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                     max_position_embeddings: int | None = None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [rotary_dim/2] float32, attention_factor) for a RoPE configuration.

    `scaling` follows transformers' `rope_parameters` keys (`rope_type`, `factor`, ...). attention_factor
    multiplies cos and sin (YaRN's magnitude correction); it is 1.0 for the other types.
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    # int64 arange then float, as transformers does, so the tables match bit for bit
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta ** exponent)
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
        if orig is None:
            raise ValueError("yarn rope scaling needs original_max_position_embeddings")

        def mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        attn = scaling.get("attention_factor")
        if attn is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return rotary_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, rotary_dim - 1)
        if lo == hi:
            hi += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        pos_freqs = theta ** exponent
        extrapolate = 1 - ramp  # 1 for high-frequency dims, which keep their original frequency
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        return inv, float(attn)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(ROPE_TYPES)}")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [N, rotary_dim/2] (float32) for integer positions [N]."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [N, H, d] by cos/sin [N, r/2]; dims past r (partial rotary) pass through unchanged."""
    r = cos.shape[-1] * 2
    full = r == x.shape[-1]
    rot = x if full else x[..., :r]
    c, s = cos[:, None, :], sin[:, None, :]
    if c.dtype != x.dtype:        # the tables are float32: cast for bf16 activations, as transformers does
        c, s = c.to(x.dtype), s.to(x.dtype)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out if full else torch.cat((out, x[..., r:]), dim=-1)
