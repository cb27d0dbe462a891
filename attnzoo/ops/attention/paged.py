"""Paged attention (PagedAttention / flash-attn `flash_attn_with_kvcache` with a block table).

The KV cache is a pool of pages, stored head-major: `k_cache [Hkv, num_pages, page_size, d]`, so one
index over flat slots gathers every head's keys of a batch as `[Hkv, B, L, d]`, which feeds batched
matmuls with no transpose copy (flash-attn's `[num_pages, page_size, Hkv, d]` would need one per layer
per step on the CPU). Sequence b's keys are the first `seq_lens[b]` slots of the pages listed in
`block_table[b]`. Its new queries are rows
`cu_seqlens_q[b]:cu_seqlens_q[b+1]` of `q [N, H, d]` and are the LAST tokens of the sequence (causal,
bottom-right aligned), which covers prefill with a cached prefix, prefill chunks and decode at once.

`plan_paged(...)` turns the block table into gather indices once per step; every layer then calls
`paged_attention_planned` with its own cache tensors, so no per-layer Python work repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnzoo.ops.attention.reference import attention_reference
from attnzoo.ops.attention.torch_impl import attention_torch


@dataclass
class PagedPlan:
    """Gather indices for one step. Decode rows (one query per sequence) are batched and padded;
    longer query runs (prefill chunks) are handled one sequence at a time."""
    decode_rows: Tensor                 # [Bd] rows of q that are single-token queries
    decode_pages: Tensor                # [Bd, P] pages holding each row's visible keys (padded with 0):
                                        # whole pages are gathered, 4 KB copies instead of 256 B ones
    decode_valid: Tensor                # [Bd, P * page_size] bool: the slot is a visible key
    prefill: list[tuple[int, int, Tensor]]  # (row_start, row_end, flat slots of all keys of that sequence)
    num_rows: int


def _slots(block_table_row: Tensor, start: int, end: int, page_size: int) -> Tensor:
    pos = torch.arange(start, end, dtype=torch.long)
    return block_table_row.long()[pos // page_size] * page_size + pos % page_size


def plan_paged(block_table: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor, page_size: int,
               window_left: int = -1) -> PagedPlan:
    """window_left >= 0 limits decode gathers to the last window_left + 1 keys (pages before that may be
    released); prefill runs gather from the first key the run's earliest query can see."""
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    dec_rows, dec_spans, prefill = [], [], []
    for b, L in enumerate(lens):
        q0, q1 = cu[b], cu[b + 1]
        nq = q1 - q0
        if nq == 0:
            continue
        if L < nq:
            raise ValueError(f"sequence {b} has {nq} new queries but only {L} keys (seq_lens must include them)")
        first = 0 if window_left < 0 else max(0, L - nq - window_left)
        if nq == 1:
            dec_rows.append(q0)
            dec_spans.append((b, first, L))
        else:
            prefill.append((q0, q1, _slots(block_table[b], first, L, page_size)))
    width = max((-(-L // page_size) - f // page_size for _, f, L in dec_spans), default=0)
    pages = torch.zeros(len(dec_spans), width, dtype=torch.long)
    valid = torch.zeros(len(dec_spans), width * page_size, dtype=torch.bool)
    for i, (b, first, L) in enumerate(dec_spans):
        p0, p1 = first // page_size, -(-L // page_size)
        pages[i, : p1 - p0] = block_table[b, p0:p1].long()
        valid[i, first - p0 * page_size: L - p0 * page_size] = True
    return PagedPlan(torch.tensor(dec_rows, dtype=torch.long), pages, valid, prefill, int(cu[-1]))


def paged_attention_planned(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan, *,
                            window_size: tuple[int, int] = (-1, -1), scale: float | None = None,
                            sinks: Tensor | None = None) -> Tensor:
    N, H, d = q.shape
    Hkv, dv = k_cache.shape[0], v_cache.shape[-1]
    kf, vf = k_cache.reshape(Hkv, -1, d), v_cache.reshape(Hkv, -1, dv)   # [Hkv, slots, d]
    out = q.new_empty(N, H, dv)
    scale = d ** -0.5 if scale is None else scale
    if len(plan.decode_rows):
        G = H // Hkv
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax precision
        qd = q[plan.decode_rows].view(-1, Hkv, G, d).transpose(0, 1).to(acc)  # [Hkv, Bd, G, d]
        Bd, P = plan.decode_pages.shape
        pages = plan.decode_pages.reshape(-1)
        # index_select over whole pages of a [Hkv, pages, page*d] view: ~3x faster than advanced indexing
        k = torch.index_select(k_cache.reshape(Hkv, k_cache.shape[1], -1), 1, pages)
        v = torch.index_select(v_cache.reshape(Hkv, v_cache.shape[1], -1), 1, pages)
        k = k.view(Hkv, Bd, -1, d).to(acc)                                   # [Hkv, Bd, P*page, d]
        v = v.view(Hkv, Bd, -1, dv).to(acc)
        s = torch.matmul(qd, k.transpose(-1, -2)).mul_(scale)                # [Hkv, Bd, G, L]
        s.masked_fill_(~plan.decode_valid[None, :, None, :], float("-inf"))
        if sinks is not None:
            sink = sinks.to(acc).view(Hkv, 1, G, 1).expand(Hkv, s.shape[1], G, 1)
            p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
        else:
            p = torch.softmax(s, -1)
        o = torch.matmul(p, v)                                               # [Hkv, Bd, G, dv]
        out[plan.decode_rows] = o.transpose(0, 1).reshape(-1, H, dv).to(q.dtype)
    for r0, r1, slots in plan.prefill:
        k = torch.index_select(kf, 1, slots).transpose(0, 1)[None]          # [1, L, Hkv, d]
        v = torch.index_select(vf, 1, slots).transpose(0, 1)[None]
        o = attention_torch(q[None, r0:r1], k, v, causal=True, window_size=window_size, scale=scale, sinks=sinks)
        out[r0:r1] = o[0]
    return out


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cu_seqlens_q: Tensor,
                    seq_lens: Tensor, *, window_size: tuple[int, int] = (-1, -1), scale: float | None = None,
                    sinks: Tensor | None = None) -> Tensor:
    """q [N, H, d]; k_cache [Hkv, P, page, d]; v_cache [Hkv, P, page, dv]; block_table [B, pages] int;
    cu_seqlens_q [B+1]; seq_lens [B] (keys per sequence, new tokens included) -> [N, H, dv]. Causal."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"expected q [N, H, d], k/v cache [Hkv, pages, page_size, d]; got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    plan = plan_paged(block_table, cu_seqlens_q, seq_lens, k_cache.shape[2], window_size[0])
    return paged_attention_planned(q, k_cache, v_cache, plan, window_size=window_size, scale=scale, sinks=sinks)


def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                              cu_seqlens_q: Tensor, seq_lens: Tensor, *, window_size: tuple[int, int] = (-1, -1),
                              scale: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """The spec: gather each sequence's keys through its block table, then dense causal attention."""
    ps = k_cache.shape[2]
    kf = k_cache.reshape(k_cache.shape[0], -1, k_cache.shape[-1]).transpose(0, 1)   # [slots, Hkv, d]
    vf = v_cache.reshape(v_cache.shape[0], -1, v_cache.shape[-1]).transpose(0, 1)
    outs = []
    for b in range(len(seq_lens)):
        q0, q1, L = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seq_lens[b])
        if q1 == q0:
            continue
        slots = _slots(block_table[b], 0, L, ps)
        k, v = kf[slots], vf[slots]
        outs.append(attention_reference(q[None, q0:q1], k[None], v[None], causal=True, window_size=window_size,
                                        scale=scale, sinks=sinks)[0])
    return torch.cat(outs)
