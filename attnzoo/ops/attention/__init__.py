"""Softmax attention with flash-attn conventions, one entry point over several backends.

Backend (attnzoo.ops.backend decides for every op family): keyword `backend=` if given, else "invariant"
inside `ops.batch_invariant.batch_invariant()`, else env var ATTNZOO_BACKEND, else "triton" for CUDA
tensors when triton imports, else "torch".
  reference  naive float32/float64 oracle (attnzoo.ops.attention.reference)
  torch      fast PyTorch form (attnzoo.ops.attention.torch_impl)
  invariant  batch-invariant form: a query's bits do not depend on its batch (attnzoo.ops.attention.invariant)
  triton     flash-attention kernels (attnzoo.ops.attention.triton), imported lazily so the CPU
             install never needs triton; CPU tensors only under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from torch import Tensor

from attnzoo.ops import backend as _backend
from attnzoo.ops.attention.blockwise import attention_blockwise
from attnzoo.ops.attention.invariant import attention_invariant
from attnzoo.ops.attention.reference import attention_reference
from attnzoo.ops.attention.torch_impl import attention_torch

BACKENDS = {"reference": attention_reference, "torch": attention_torch, "blockwise": attention_blockwise,
            "invariant": attention_invariant}
TRITON = ("attnzoo.ops.attention.triton.op", "attention_triton")

__all__ = ["attention", "attention_reference", "attention_torch", "BACKENDS", "resolve_backend"]


def resolve_backend(backend: str | None = None, q: Tensor | None = None) -> str:
    """The backend name `attention` would run (see attnzoo.ops.backend for the order)."""
    return _backend.resolve("attention", backend, q, BACKENDS, TRITON[0])


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    window_size: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    sinks: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention.

    q [B, Tq, H, d], k [B, Tk, Hkv, d], v [B, Tk, Hkv, dv] -> [B, Tq, H, dv] in q's dtype.
    H % Hkv == 0; query head h reads KV head h // (H // Hkv) (MHA / GQA / MQA).
    Varlen: q/k/v packed as [1, total, H, d] or [total, H, d] with int32 cu_seqlens_q/_k
    ([N+1], from 0; cu_seqlens_k defaults to cu_seqlens_q); output keeps the input rank.
    Causal and windows are bottom-right aligned: query i sits at key a = i + Tk - Tq and
    sees keys j in [a - left, a + right] (-1 = unbounded; causal forces right = 0).
    sinks [H]: per-head logits that join the softmax denominator and carry no value.
    scale defaults to 1/sqrt(d). A row that sees no key outputs 0 (LSE -inf, or the sink).
    return_lse=True also returns the natural-log LSE of the scaled, masked scores
    (sink included) as [B, H, Tq] (varlen: [H, total_q]) in float32 (float64 for fp64 input).
    """
    fn = _backend.kernel("attention", backend, q, BACKENDS, TRITON)
    return fn(
        q, k, v, causal=causal, window_size=window_size, scale=scale, sinks=sinks,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=return_lse,
    )
