"""NSA's compression blocks: which blocks a sequence completes, how packed sequences pack them, and the blocks
themselves (mean-pooled, or raw for a learned compressor). Block i = tokens [i*d, i*d + l) of its sequence."""

from __future__ import annotations

import torch
from torch import Tensor


def num_compressed_blocks(T: int, l: int, d: int) -> int:
    """Complete compression blocks in a sequence of T tokens: i with i*d + l <= T."""
    return 0 if T < l else (T - l) // d + 1


def compressed_cu_seqlens(cu_seqlens: Tensor, l: int, d: int) -> Tensor:
    """Offsets of each sequence's compressed tokens when they are packed like the raw tokens (int32)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [num_compressed_blocks(int(n), l, d) for n in lens]
    out = torch.zeros(len(counts) + 1, dtype=torch.int32, device=cu_seqlens.device)
    out[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
    return out


def nsa_compress_keys(k: Tensor, l: int, d: int, mode: str = "mean", cu_seqlens: Tensor | None = None) -> Tensor:
    """Cut keys (or values) into the complete compression blocks `[i*d, i*d + l)` (stride d, length l).

    k [B, T, H, dk] -> mode "mean": [B, Nc, H, dk], the mean of each block (fla's mean pooling when
    l == d; fla also emits a trailing partial block, which no query can see, so it is dropped here);
    mode "blocks": [B, Nc, H, l, dk], the raw blocks, the input of a learned compressor.
    Nc = num_compressed_blocks(T, l, d). Packed input [total, H, dk] (or [1, total, H, dk]) with
    cu_seqlens: blocks never cross sequences; the output is packed by `compressed_cu_seqlens`.
    """
    if mode not in ("mean", "blocks"):
        raise ValueError(f"nsa_compress_keys: mode must be 'mean' or 'blocks', got {mode!r}")
    if d < 1 or l < 1:
        raise ValueError(f"nsa_compress_keys: need l >= 1 and d >= 1, got l={l}, d={d}")
    if cu_seqlens is not None:
        squeeze = k.dim() == 3
        kk = k if squeeze else k[0]
        cu = cu_seqlens.tolist()
        parts = [nsa_compress_keys(kk[a:b].unsqueeze(0), l, d, mode)[0] for a, b in zip(cu, cu[1:])]
        out = torch.cat(parts, 0) if parts else kk.new_zeros(0, *kk.shape[1:])
        return out if squeeze else out.unsqueeze(0)
    B, T, H, dk = k.shape
    nc = num_compressed_blocks(T, l, d)
    if nc == 0:
        blocks = k.new_zeros(B, 0, H, l, dk)
    else:
        # unfold: [B, Nc, H, dk, l] (a strided view), slot j of block i is token i*d + j
        blocks = k.unfold(1, l, d).transpose(-1, -2)
    if mode == "blocks":
        return blocks
    return blocks.mean(3)
