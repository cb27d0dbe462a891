"""MLA decode over a paged latent cache (absorbed form, DeepSeek-V3 / FlashMLA "MQA mode").

After absorbing W_UK into the query (docs/mechanisms/latent.md §4) every head's query is
[q_lat (dv = kv_lora_rank) | q_pe (dr)] = Dqk wide and attends to ONE shared key per token: the cached
row [c_kv | k_pe] (Dqk). The value is the first dv dims of that same row, so the cache holds nothing
else. Layout: cache [num_pages, page_size, Dqk]; token j of sequence b lives at page
block_table[b, j // page_size], slot j % page_size. The query is the sequence's last token, so every one
of its seq_lens[b] cached tokens is visible. `scale` is the model's (dn + dr)**-0.5 * mscale**2, not
Dqk**-0.5, so it is always passed in.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int) -> None:
    if (q.dim() != 3 or cache.dim() != 3 or q.shape[-1] != cache.shape[-1] or not 0 < dv <= q.shape[-1]
            or block_table.dim() != 2 or block_table.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],)):
        raise ValueError(f"mla_paged_decode: expected q [B, H, Dqk], cache [pages, page_size, Dqk], block_table "
                         f"[B, P], seq_lens [B], 0 < dv <= Dqk; got q {tuple(q.shape)}, cache {tuple(cache.shape)}, "
                         f"block_table {tuple(block_table.shape)}, seq_lens {tuple(seq_lens.shape)}, dv {dv}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # softmax precision


def mla_paged_decode_reference(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int,
                               scale: float) -> Tensor:
    """The spec, one sequence at a time: q [B, H, Dqk] -> [B, H, dv] in q's dtype (0 for an empty sequence)."""
    _check(q, cache, block_table, seq_lens, dv)
    B, H, _ = q.shape
    ps = cache.shape[1]
    acc = _acc(q.dtype)
    flat = cache.reshape(-1, cache.shape[-1])
    out = torch.zeros(B, H, dv, dtype=acc, device=q.device)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        pos = torch.arange(L, device=cache.device)
        k = flat[block_table[b].long().to(cache.device)[pos // ps] * ps + pos % ps].to(acc)   # [L, Dqk]
        p = torch.softmax((q[b].to(acc) @ k.T) * scale, dim=-1)                               # [H, L]
        out[b] = p @ k[:, :dv]
    return out.to(q.dtype)


def mla_paged_decode_torch(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int,
                           scale: float) -> Tensor:
    """Batched CPU form: gather whole pages once per sequence (shared by all H heads), then one
    [H, Dqk] x [Dqk, L] product per sequence and a masked softmax. Same contract as the reference."""
    _check(q, cache, block_table, seq_lens, dv)
    B, H, D = q.shape
    ps = cache.shape[1]
    acc = _acc(q.dtype)
    lens = seq_lens.to(cache.device, torch.long)
    width = -(-int(lens.max()) // ps) if B else 0   # one host sync: pages of the longest sequence
    if width == 0:
        return q.new_zeros(B, H, dv)
    table = block_table[:, :width].to(cache.device, torch.long)
    used = torch.arange(width, device=cache.device) < (-(-lens // ps))[:, None]
    pages = torch.where(used, table, 0)   # entries past a sequence's pages may be stale: read page 0 instead
    # index_select over whole pages of a [pages, page_size * Dqk] view: page-sized copies, not row-sized.
    k = torch.index_select(cache.reshape(cache.shape[0], -1), 0, pages.reshape(-1)).view(B, width * ps, D).to(acc)
    s = torch.bmm(q.to(acc), k.transpose(1, 2)).mul_(scale)                    # [B, H, width * page]
    valid = torch.arange(width * ps, device=cache.device) < lens[:, None]
    s.masked_fill_(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse.clamp(min=torch.finfo(acc).min))                   # an empty sequence gives 0
    return torch.bmm(p, k[..., :dv]).to(q.dtype)


def mla_paged_decode(q: Tensor, cache: Tensor, block_table: Tensor, seq_lens: Tensor, dv: int,
                     scale: float) -> Tensor:
    """The absorbed decode for the device of the cache: the Triton kernel on CUDA, the batched torch form
    elsewhere. Same contract as mla_paged_decode_reference."""
    if cache.is_cuda:
        from attnzoo.ops.latent.triton_kernels import mla_paged_decode_triton  # triton only where CUDA is

        return mla_paged_decode_triton(q, cache, block_table, seq_lens, dv, scale)
    return mla_paged_decode_torch(q, cache, block_table, seq_lens, dv, scale)
