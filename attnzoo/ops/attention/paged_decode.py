"""`paged_decode`: one decode step of paged attention for a whole batch, one call per layer (the op
`torch.ops.attnzoo.paged_decode`). Row b's new k/v are written to `slots[b]` of the head-major page pools
(`k_cache [Hkv, pages, page_size, d]`, attnzoo/ops/attention/paged.py), then its one query attends over the
first `seq_lens[b]` keys listed by `block_table[b]` (the last window_left + 1 of them when window_left >= 0),
with optional attention sinks. A row with `seq_lens` 0 gets zeros and a slot < 0 is not written: the padded
rows of a bucketed batch (attnzoo/engine/graph.py) change nothing.

On the CPU the op is attnzoo/csrc/paged_attn.cpp (keys read in place, GQA heads grouped, long contexts split
over threads and merged by log-sum-exp); `paged_decode_torch` below is the same computation in PyTorch, which
serves other devices and installs without the extension. Both are tested against `paged_attention_reference`.
The op has tensor/int/float arguments only and a fake implementation, so a compiled step calls it as one node.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo.ops.extension import HAVE_KERNEL

SCHEMA = ("(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots, "
          "Tensor block_table, Tensor seq_lens, float scale, int window_left=-1, Tensor? sinks=None) -> Tensor")


def paged_decode_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                       block_table: Tensor, seq_lens: Tensor, scale: float, window_left: int = -1,
                       sinks: Tensor | None = None) -> Tensor:
    """q [B, H, d], k [B, Hkv, d], v [B, Hkv, dv], slots [B], block_table [B, W], seq_lens [B] -> [B, H, dv]."""
    Hkv, ps, dv = k_cache.shape[0], k_cache.shape[2], v_cache.shape[-1]
    B, H, d = q.shape
    keep = slots >= 0
    for cache, new in ((k_cache, k), (v_cache, v)):
        cache.view(Hkv, -1, cache.shape[-1])[:, slots[keep]] = new[keep].transpose(0, 1).to(cache.dtype)
    W = block_table.shape[1]
    pages = block_table.long().clamp(min=0)                                # [B, W]
    K = k_cache[:, pages].flatten(2, 3).float()                           # [Hkv, B, W * ps, d]
    V = v_cache[:, pages].flatten(2, 3).float()
    pos = torch.arange(W * ps, device=q.device)
    lens = seq_lens.long()[:, None]
    seen = pos < lens
    if window_left >= 0:
        seen &= pos >= lens - 1 - window_left
    s = q.float().view(B, Hkv, H // Hkv, d).transpose(0, 1) @ K.transpose(-1, -2) * scale   # [Hkv, B, G, L]
    s = s.masked_fill(~seen[None, :, None], float("-inf"))
    if sinks is not None:   # a sink is one more logit per head with no value
        s = torch.cat([s, sinks.float().view(Hkv, 1, H // Hkv, 1).expand(-1, B, -1, 1)], -1)
    p = torch.softmax(s, -1).nan_to_num_(0.0)[..., :W * ps]              # a row with no keys: zeros
    return (p @ V).transpose(0, 1).reshape(B, H, dv).to(q.dtype)


if not HAVE_KERNEL:   # the PyTorch form takes the op's name, so callers and compiled steps see one op
    torch.library.define("attnzoo::paged_decode", SCHEMA)
    torch.library.impl("attnzoo::paged_decode", "CPU")(paged_decode_torch)
torch.library.impl("attnzoo::paged_decode", "CUDA")(paged_decode_torch)


@torch.library.register_fake("attnzoo::paged_decode")
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, block_table: Tensor,
      seq_lens: Tensor, scale: float, window_left: int = -1, sinks: Tensor | None = None) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                 block_table: Tensor, seq_lens: Tensor, scale: float, window_left: int = -1,
                 sinks: Tensor | None = None) -> Tensor:
    """See the module docstring."""
    return torch.ops.attnzoo.paged_decode(q, k_cache, v_cache, k, v, slots, block_table, seq_lens, scale,
                                          window_left, sinks)
