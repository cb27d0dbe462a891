"""Host-side helpers every Triton op shares: output buffers (NaN-filled for the tests), the dot precision a
dtype gets, and whether the kernels run in Triton's interpreter (on the CPU)."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.empty, or NaN-filled under ATTNZOO_TRITON_POISON=1 so an element a kernel skips fails loudly."""
    if os.environ.get("ATTNZOO_TRITON_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots: TF32 would be ~1000x less accurate than the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
