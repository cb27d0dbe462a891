"""MLA decode over a paged latent cache (absorbed form, DeepSeek-V3 / FlashMLA "MQA mode").

After absorbing W_UK into the query (docs/mechanisms/latent.md §4) every head's query is
[q_lat (dv = kv_lora_rank) | q_pe (dr)] = Dqk wide and attends to ONE shared key per token: the cached
row [c_kv | k_pe] (Dqk). The value is the first dv dims of that same row, so the cache holds nothing
else. Layout: cache [num_pages, page_size, Dqk]; token j of sequence b lives at page
block_table[b, j // page_size], slot j % page_size. The query is the sequence's last token, so every one
of its seq_lens[b] cached tokens is visible. `scale` is the model's (dn + dr)**-0.5 * mscale**2, not
Dqk**-0.5, so it is always passed in.

Forms: `mla_paged_decode_reference` (reference.py, the spec), `mla_paged_decode_torch` (torch_impl.py,
batched page gathers) and `mla_paged_decode_triton` (triton_kernels.py, flash-decoding). `mla_paged_decode`
runs the one the attention family's backend resolves to (attnzoo.ops.backend, as paged attention's decode
does): "triton" the kernel, any other form the torch one.
"""

from __future__ import annotations

from torch import Tensor

from attnzoo.ops.attention import resolve_backend
from attnzoo.ops.latent.reference import mla_paged_decode_reference
from attnzoo.ops.latent.torch_impl import mla_paged_decode_torch

__all__ = ["mla_paged_decode", "mla_paged_decode_reference", "mla_paged_decode_torch"]


def mla_paged_decode(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int, scale: float,
                     backend: str | None = None) -> Tensor:
    """The absorbed decode in the form the attention backend picks (`backend=`, ATTNZOO_BACKEND, else the
    kernel for CUDA tensors). Same contract as mla_paged_decode_reference."""
    if resolve_backend(backend, q) == "triton":
        from attnzoo.ops.latent.triton_kernels import mla_paged_decode_triton  # triton only when resolved

        return mla_paged_decode_triton(q, cache, block_table, seq_lens, dv, scale)
    return mla_paged_decode_torch(q, cache, block_table, seq_lens, dv, scale)
