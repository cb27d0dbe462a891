"""Sparse MLA in the absorbed (MQA) form: each query row attends to its own selected latent rows (DSA).

q_abs [n, H, dc + dr] (the no-rope query with w_uk folded in, then the roped part), a flat latent pool
[R, dc + dr] and per query the selected pool rows [n, k] (-1 = unused). Keys are the whole latent row,
values its first dc dims; the caller multiplies the [n, H, dc] result by w_uv. A query with no valid
row outputs 0.
"""

from __future__ import annotations

import torch

from attnzoo.ops import backend as _backend
from attnzoo.ops.sparse import TRITON

ROWS_PER_CHUNK = 256  # bounds the gathered [rows, k, D] block: a 2048-token selection of 576-wide rows


def mla_sparse_absorbed(q_abs: torch.Tensor, latent: torch.Tensor, rows: torch.Tensor, dc: int,
                        scale: float, backend: str | None = None) -> torch.Tensor:
    """backend (the sparse family's, attnzoo.ops.backend): "torch" (chunked gathers) or "triton": the
    token-sparse kernel as one MQA head group (K = the latent rows, V = their first dc dims), forward and
    backward; the default for CUDA tensors."""
    if q_abs.dim() != 3 or rows.dim() != 2 or rows.shape[0] != q_abs.shape[0]:
        raise ValueError(f"q_abs must be [n, H, D] and rows [n, k]; got {tuple(q_abs.shape)}, {tuple(rows.shape)}")
    if q_abs.shape[-1] != latent.shape[-1]:
        raise ValueError(f"query width {q_abs.shape[-1]} != latent width {latent.shape[-1]}")
    if _backend.resolve("sparse", backend, q_abs, ("torch",), TRITON) == "triton" and q_abs.dtype != torch.float64:
        from attnzoo.ops.sparse.triton_kernels import sparse_attention_triton
        kv = latent.to(q_abs.dtype)[None, :, None]                           # [1, R, 1, D]
        return sparse_attention_triton(q_abs[None], kv, kv[..., :dc], rows[None, :, None], scale=scale,
                                       causal=False)[0]
    out = q_abs.new_zeros(*q_abs.shape[:2], dc, dtype=torch.float32)
    for a in range(0, rows.shape[0], ROWS_PER_CHUNK):
        r = rows[a:a + ROWS_PER_CHUNK]
        valid = r >= 0
        kv = latent[r.clamp(min=0)].float()                                   # [c, k, D]
        s = torch.einsum("chd,ckd->chk", q_abs[a:a + ROWS_PER_CHUNK].float(), kv) * scale
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)                              # all-invalid rows -> 0
        out[a:a + ROWS_PER_CHUNK] = torch.einsum("chk,ckd->chd", p, kv[..., :dc])
    return out.to(q_abs.dtype)
