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

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnzoo.ops import batch_invariant
from attnzoo.ops.attention import attention, resolve_backend
from attnzoo.ops.attention.invariant import KEY_BLOCK, attend_rows, attend_shared, block_pad
from attnzoo.ops.attention.reference import attention_reference


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
    # Cascade: decode rows whose sequences share their first pages (a radix-cache hit) attend to that
    # prefix together: its K/V are gathered once and multiplied against all their queries, then merged
    # with each row's own suffix by log-sum-exp. (index into decode rows [n], prefix pages [p])
    cascades: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    # CUDA decode reads pages straight through the block table (paged_decode_triton): [Bd, pages], [Bd]
    decode_block_table: Tensor | None = None
    decode_seq_lens: Tensor | None = None
    # Batch-invariant layout (planned inside `batch_invariant()`): every gather starts at a KEY_BLOCK-aligned
    # key and covers whole blocks, no cascades; prefill_key_start[i] is the absolute position of the first
    # key of prefill run i (0 unless a window let earlier pages go).
    key_block: int = 0
    prefill_key_start: list[int] = field(default_factory=list)

    _bias: dict = field(default_factory=dict, repr=False)

    def decode_bias(self, heads: int, dtype: torch.dtype) -> Tensor:
        """The decode rows' mask as an additive bias [heads * Bd, 1, L] (0 visible, -inf not), built once per
        step for every layer with that many KV heads."""
        key = (heads, dtype)
        if key not in self._bias:
            bias = torch.zeros(self.decode_valid.shape, dtype=dtype, device=self.decode_valid.device)
            bias.masked_fill_(~self.decode_valid, float("-inf"))
            self._bias[key] = bias[None, :, None].expand(heads, -1, -1, -1).reshape(heads * bias.shape[0], 1, -1)
        return self._bias[key]

    def to(self, device: torch.device | str) -> "PagedPlan":
        """The plan on the device of the cache, moved once per step rather than once per layer."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PagedPlan(mv(self.decode_rows), mv(self.decode_pages), mv(self.decode_valid),
                         [(a, b, mv(t)) for a, b, t in self.prefill], self.num_rows,
                         [(mv(r), mv(p)) for r, p in self.cascades], mv(self.decode_block_table),
                         mv(self.decode_seq_lens), self.key_block, self.prefill_key_start)


MIN_CASCADE_PAGES = 2   # shorter shared prefixes are cheaper to gather per row


def _slots(block_table_row: Tensor, start: int, end: int, page_size: int) -> Tensor:
    pos = torch.arange(start, end, dtype=torch.long)
    return block_table_row.long()[pos // page_size] * page_size + pos % page_size


def plan_paged(block_table: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor, page_size: int,
               window_left: int = -1) -> PagedPlan:
    """window_left >= 0 limits decode gathers to the last window_left + 1 keys (pages before that may be
    released); prefill runs gather from the first key the run's earliest query can see. Inside
    `batch_invariant()` the plan takes the invariant layout (see PagedPlan.key_block)."""
    key_block = KEY_BLOCK if batch_invariant.enabled() else 0
    if key_block and key_block % page_size:
        raise ValueError(f"batch-invariant paged attention needs a page size dividing {key_block}, got {page_size}")
    align = key_block or 1
    cu_t = cu_seqlens_q.long()
    nq_t, lens_t = cu_t[1:] - cu_t[:-1], seq_lens.long()
    first_t = lens_t - nq_t - window_left if window_left >= 0 else torch.zeros_like(lens_t)
    first_t = first_t.clamp_(min=0)
    if bool((lens_t < nq_t).any()):
        b = int((lens_t < nq_t).nonzero()[0])
        raise ValueError(f"sequence {b} has {int(nq_t[b])} new queries but only {int(lens_t[b])} keys "
                         "(seq_lens must include them)")
    # decode rows (one query) are planned with tensor ops, prefill runs one sequence at a time
    dec_b = (nq_t == 1).nonzero()[:, 0]
    prefill, key_start = [], []
    for b in (nq_t > 1).nonzero()[:, 0].tolist():
        start = int(first_t[b]) // align * align
        prefill.append((int(cu_t[b]), int(cu_t[b + 1]), _slots(block_table[b], start, int(lens_t[b]), page_size)))
        key_start.append(start)
    L, first = lens_t[dec_b], first_t[dec_b]
    starts = first // align * align // page_size              # first page each decode row gathers
    cascades = []
    if window_left < 0 and len(dec_b) > 1 and not key_block:
        starts_l = starts.tolist()
        cascades = _shared_prefixes(block_table, list(zip(dec_b.tolist(), first.tolist(), L.tolist())), page_size,
                                    starts_l)
        starts = torch.tensor(starts_l, dtype=torch.long)
    ends = -(-L // page_size)
    width = int((ends - starts).max()) if len(dec_b) else 0
    if key_block:   # whole key blocks
        per_block = key_block // page_size
        width = -(-width // per_block) * per_block
    table = block_table[dec_b].long()
    col = starts[:, None] + torch.arange(width)[None]
    inside = col < ends[:, None]
    pages = table.gather(1, col.clamp(max=max(table.shape[1] - 1, 0))).masked_fill_(~inside, 0) if width else \
        torch.zeros(len(dec_b), 0, dtype=torch.long)
    slot = torch.arange(width * page_size)[None] + (starts * page_size)[:, None]   # absolute key position
    valid = (slot >= first[:, None]) & (slot < L[:, None])
    return PagedPlan(cu_t[:-1][dec_b], pages, valid, prefill, int(cu_t[-1]), cascades, block_table[dec_b],
                     L.to(torch.int32), key_block, key_start)


def _shared_prefixes(block_table: Tensor, spans: list[tuple[int, int, int]], page_size: int,
                     starts: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Group decode rows by their first MIN_CASCADE_PAGES pages; a group's shared prefix is the pages all
    its rows have in common (full pages strictly before each row's last key). Moves each grouped row's
    `starts` past it."""
    by_head: dict[tuple[int, ...], list[int]] = {}
    if block_table.shape[1] < MIN_CASCADE_PAGES:
        return []
    heads = block_table[[b for b, _, _ in spans], :MIN_CASCADE_PAGES].tolist()   # one host copy for all rows
    for i, ((_, _, L), head) in enumerate(zip(spans, heads)):
        if (L - 1) // page_size >= MIN_CASCADE_PAGES:
            by_head.setdefault(tuple(head), []).append(i)
    out = []
    for rows in by_head.values():
        if len(rows) < 2:
            continue
        tables = [block_table[spans[i][0]].tolist() for i in rows]
        limit = min((spans[i][2] - 1) // page_size for i in rows)  # never share the page being written
        n = 0
        while n < limit and all(t[n] == tables[0][n] for t in tables):
            n += 1
        if n < MIN_CASCADE_PAGES:
            continue
        for i in rows:
            starts[i] = n
        out.append((torch.tensor(rows, dtype=torch.long), torch.tensor(tables[0][:n], dtype=torch.long)))
    return out


def _attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """q [Hkv, R, M, d] against k/v [Hkv, R, L, d] -> (normalised output [Hkv, R, M, dv], lse [Hkv, R, M])."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if valid is not None:
        s.masked_fill_(~valid[None, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp(min=torch.finfo(s.dtype).min))  # a fully masked row gives 0
    return torch.matmul(p, v), lse


def _gather_pages(cache: Tensor, pages: Tensor, rows: int, acc: torch.dtype) -> Tensor:
    """[Hkv, P, page, d] cache, [rows * n] page ids -> [Hkv, rows, n * page, d] in acc. index_select over
    whole pages of a [Hkv, P, page*d] view is ~3x faster than advanced indexing."""
    Hkv, d = cache.shape[0], cache.shape[-1]
    out = torch.index_select(cache.reshape(Hkv, cache.shape[1], -1), 1, pages.reshape(-1))
    return out.view(Hkv, rows, -1, d).to(acc)


def _decode_only(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan, scale: float) -> Tensor:
    """A step of single-token queries only (the common case, no cascades or sinks): no row scatter, the scale
    and the mask in one baddbmm, the softmax in one op."""
    N, H, d = q.shape
    Hkv, dv = k_cache.shape[0], v_cache.shape[-1]
    G = H // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax precision
    qd = q.reshape(N, Hkv, G, d).transpose(0, 1).to(acc).reshape(Hkv * N, G, d)
    k = _gather_pages(k_cache, plan.decode_pages, N, acc).view(Hkv * N, -1, d)
    v = _gather_pages(v_cache, plan.decode_pages, N, acc).view(Hkv * N, -1, dv)
    s = torch.baddbmm(plan.decode_bias(Hkv, acc), qd, k.transpose(1, 2), alpha=scale)
    o = torch.bmm(s.softmax(-1), v).view(Hkv, N, G, dv)
    return o.transpose(0, 1).reshape(N, H, dv).to(q.dtype)


def paged_attention_planned(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan, *,
                            window_size: tuple[int, int] = (-1, -1), scale: float | None = None,
                            sinks: Tensor | None = None) -> Tensor:
    N, H, d = q.shape
    Hkv, dv = k_cache.shape[0], v_cache.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    if plan.key_block:
        return _planned_invariant(q, k_cache, v_cache, plan, window_size, scale, sinks, q.new_empty(N, H, dv))
    triton = resolve_backend(None, q) == "triton" and plan.decode_block_table is not None
    if len(plan.decode_rows) == N and not triton and not plan.cascades and sinks is None:
        return _decode_only(q, k_cache, v_cache, plan, scale)
    out = q.new_empty(N, H, dv)
    if len(plan.decode_rows) and triton:
        # Flash-decoding kernel: reads each K/V page once per KV head, no gather copies.
        from attnzoo.ops.attention.triton.paged_decode import paged_decode_triton

        rows = plan.decode_rows.to(q.device)
        out[rows] = paged_decode_triton(q[rows], k_cache, v_cache, plan.decode_block_table.to(q.device),
                                        plan.decode_seq_lens.to(q.device), scale, sinks, window_size[0])
    elif len(plan.decode_rows):
        G = H // Hkv
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax precision
        qd = q[plan.decode_rows].view(-1, Hkv, G, d).transpose(0, 1).to(acc)  # [Hkv, Bd, G, d]
        Bd, P = plan.decode_pages.shape
        o, lse = _attend(qd, _gather_pages(k_cache, plan.decode_pages, Bd, acc),
                         _gather_pages(v_cache, plan.decode_pages, Bd, acc), plan.decode_valid, scale)
        for rows, prefix in plan.cascades:
            n = len(rows)
            qc = qd[:, rows].reshape(Hkv, 1, n * G, d)          # every row's queries against one prefix copy
            oc, lc = _attend(qc, _gather_pages(k_cache, prefix, 1, acc), _gather_pages(v_cache, prefix, 1, acc),
                             None, scale)
            oc, lc = oc.view(Hkv, n, G, dv), lc.view(Hkv, n, G)
            both = torch.logaddexp(lse[:, rows], lc)
            o[:, rows] = o[:, rows] * torch.exp(lse[:, rows] - both)[..., None] + oc * torch.exp(lc - both)[..., None]
            lse[:, rows] = both
        if sinks is not None:  # the sink joins the denominator and carries no value
            sink = sinks.to(acc).view(Hkv, 1, G)
            o = o * torch.exp(lse - torch.logaddexp(lse, sink))[..., None]
        out[plan.decode_rows] = o.transpose(0, 1).reshape(-1, H, dv).to(q.dtype)
    kf, vf = k_cache.reshape(Hkv, -1, d), v_cache.reshape(Hkv, -1, dv)   # [Hkv, slots, d]
    for r0, r1, slots in plan.prefill:
        slots = slots.to(kf.device)  # plans are host-side; no-op on CPU
        k = torch.index_select(kf, 1, slots).transpose(0, 1)[None]          # [1, L, Hkv, d]
        v = torch.index_select(vf, 1, slots).transpose(0, 1)[None]
        # the flash kernel on CUDA, the torch form on CPU (attnzoo.ops.backend)
        o = attention(q[None, r0:r1], k, v, causal=True, window_size=window_size, scale=scale, sinks=sinks)
        out[r0:r1] = o[0]
    return out


def _planned_invariant(q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedPlan, window_size: tuple[int, int],
                       scale: float, sinks: Tensor | None, out: Tensor) -> Tensor:
    """The batch-invariant forms over the pages: decode rows each against their own block-aligned gather,
    prefill runs against their sequence's keys (ops/attention/invariant.py)."""
    N, H, d = q.shape
    Hkv = k_cache.shape[0]
    G = H // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sk = None if sinks is None else sinks.to(acc)
    if len(plan.decode_rows):
        Bd = len(plan.decode_rows)
        k = _gather_pages(k_cache, plan.decode_pages, Bd, acc).transpose(0, 1)   # [Bd, Hkv, L, d]
        v = _gather_pages(v_cache, plan.decode_pages, Bd, acc).transpose(0, 1)
        o, _ = attend_rows(q[plan.decode_rows].to(acc).view(Bd, Hkv, G, d), k.contiguous(), v.contiguous(),
                           plan.decode_valid, scale, sk)
        out[plan.decode_rows] = o.reshape(Bd, H, -1).to(q.dtype)
    left = window_size[0]
    kf, vf = k_cache.reshape(Hkv, -1, d), v_cache.reshape(Hkv, -1, v_cache.shape[-1])
    for (r0, r1, slots), start in zip(plan.prefill, plan.prefill_key_start):
        slots = slots.to(kf.device)
        nq, n = r1 - r0, len(slots)
        pos = torch.arange(start + n - nq, start + n, device=q.device)[:, None]   # the queries' positions
        key = torch.arange(start, start + n, device=q.device)[None]
        seen = (key <= pos) & ((key >= pos - left) if left >= 0 else True)
        k = block_pad(torch.index_select(kf, 1, slots).to(acc), 1, start)
        v = block_pad(torch.index_select(vf, 1, slots).to(acc), 1, start)
        o, _ = attend_shared(q[r0:r1].to(acc).view(nq, Hkv, G, d), k, v, block_pad(seen, 1, start), scale, sk)
        out[r0:r1] = o.reshape(nq, H, -1).to(q.dtype)
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
