"""Select-then-attend: attention over a per-query selection of keys (DSA, MSA, NSA's selection branch).

Two attend ops, three backends each (reference = the spec, torch = gather + matmuls, triton = group-
centric kernels, fwd + bwd), plus the selectors that produce their indices and the indexer KL losses.

  sparse_attention(q, k, v, indices, *, scale=None, causal=True, return_lse=False, backend=None)
  block_sparse_attention(q, k, v, block_indices, block_size, *, scale=None, causal=True, return_lse=False,
                         backend=None)
      q [B, Tq, H, dqk], k [B, Tk, Hkv, dqk], v [B, Tk, Hkv, dv] -> [B, Tq, H, dv] (q's dtype)
      (+ LSE [B, H, Tq], natural log, float32 / float64).
      indices [B, Tq, Hkv, K] int: key positions, -1 = unused; block_indices [B, Tq, Hkv, nb]: blocks of
      block_size keys anchored at key 0. Query head h reads the selection of its group h // (H / Hkv).
      Each query attends softmax over its group's selected keys AND (causal) keys j <= i + Tk - Tq.
      A key (block) named twice counts once (every backend dedupes). No valid key: output 0, LSE -inf.
      Indices outside [-1, Tk) (blocks: [-1, ceil(Tk / bs))) raise ValueError.

Backend (attnzoo.ops.backend): `backend=` if given, else env ATTNZOO_SPARSE_BACKEND, else "triton" for
CUDA tensors when triton imports, else "torch". "triton" on CPU tensors needs TRITON_INTERPRET=1 (tests).
Selectors: attnzoo.ops.sparse.select; KL losses: attnzoo.ops.sparse.kl; cost model: .cost.
"""

from __future__ import annotations

from torch import Tensor

from attnzoo.ops import backend as _backend
from attnzoo.ops.sparse.reference import (
    block_sparse_attention_reference,
    blocks_to_token_indices,
    sparse_attention_reference,
)
from attnzoo.ops.sparse.torch_impl import block_sparse_attention_torch, sparse_attention_torch

TOKEN_FORMS = {"reference": sparse_attention_reference, "torch": sparse_attention_torch}
BLOCK_FORMS = {"reference": block_sparse_attention_reference, "torch": block_sparse_attention_torch}
TRITON = "attnzoo.ops.sparse.triton_kernels"

__all__ = [
    "sparse_attention", "block_sparse_attention", "sparse_attention_reference", "block_sparse_attention_reference",
    "sparse_attention_torch", "block_sparse_attention_torch", "blocks_to_token_indices",
]


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scale: float | None = None,
                     causal: bool = True, return_lse: bool = False,
                     backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of each query (head group) over its selected keys; see the module docstring."""
    fn = _backend.kernel("sparse", backend, q, TOKEN_FORMS, (TRITON, "sparse_attention_triton"))
    return fn(q, k, v, indices, scale=scale, causal=causal, return_lse=return_lse)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_size: int, *,
                           scale: float | None = None, causal: bool = True, return_lse: bool = False,
                           backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of each query (head group) over its selected key blocks; see the module docstring."""
    fn = _backend.kernel("sparse", backend, q, BLOCK_FORMS, (TRITON, "block_sparse_attention_triton"))
    return fn(q, k, v, block_indices, block_size, scale=scale, causal=causal, return_lse=return_lse)
