"""The per-step cache handle of the paged engine: `build_step` turns the scheduled sequences' page tables (the
accounting's, carried by the step's inputs) into gather plans and slot maps once per step (not per layer) over
this rank's `CacheTensors`; the `PagedStep` it returns is the layers' `KVCache` (attnzoo/layers/batch.py): it
writes each layer's new rows into its pages and hands back the pages and spans to attend over, or runs paged
softmax attention itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnzoo.engine.cache_tensors import CacheTensors
from attnzoo.layers.batch import Batch, Context, Span
from attnzoo.layers.cache_spec import CacheKind, CacheSpec, CompressedKV, RecurrentState
from attnzoo.ops.attention.paged import PagedPlan, paged_attention_planned, plan_paged


@dataclass
class SeqView:
    """What `build_step` reads of a request: its page tables, computed tokens and state slot."""
    page_tables: list[list[int]]
    num_computed: int
    state_slot: int | None


def build_step(cache: CacheTensors, reqs: list[SeqView], num_new: list[int]) -> "PagedStep":
    """A handful of tensor ops per page table, whatever the batch: no per-request tensors."""
    B = len(reqs)
    new = torch.tensor(num_new, dtype=torch.long)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = new.cumsum(0)
    start = torch.tensor([r.num_computed for r in reqs], dtype=torch.long)
    seq_lens = start + new
    rows = torch.repeat_interleave(torch.arange(B), new)
    pos = start[rows] + torch.arange(len(rows)) - cu[:-1].long()[rows]
    plans, slot_maps = [], []
    for gi, window in enumerate(cache.windows):
        lists = [r.page_tables[gi] for r in reqs]
        width = max(len(t) for t in lists)
        # released pages (-1) are never gathered: 0 stands in for them
        table = torch.tensor([t + [0] * (width - len(t)) for t in lists], dtype=torch.long).clamp_(min=0)
        left = window - 1 if window is not None else -1
        plans.append(plan_paged(table, cu, seq_lens, cache.page_size, left).to(cache.device))
        slots = table[rows, pos // cache.page_size] * cache.page_size + pos % cache.page_size
        slot_maps.append(slots.to(cache.device, non_blocking=True))
    state_slots = None
    if cache.states is not None:
        state_slots = torch.tensor([r.state_slot for r in reqs], dtype=torch.long, device=cache.device)
    return PagedStep(cache, plans, slot_maps, pos.to(cache.device), state_slots)


@dataclass
class PagedStep:
    """Implements the layers' KVCache protocol for one step of the paged engine."""
    cache: CacheTensors
    plans: list[PagedPlan]          # per page table
    slot_maps: list[torch.Tensor]   # per page table: the pool slot of each new token
    positions: torch.Tensor         # [N] each new token's position in its sequence
    state_slots: torch.Tensor | None = None   # [B] each sequence's slot in the state pool
    _spans: dict[int, list[Span]] = field(default_factory=dict)   # per page table, built on first use

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, *,
               window_size: tuple[int, int], scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        kc, vc, table = self._write_kv(layer_idx, k, v)
        return paged_attention_planned(q, kc, vc, self.plans[table], window_size=window_size, scale=scale,
                                       sinks=sinks)

    def _write_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store this step's k/v [N, Hkv, d]; the layer's head-major pools [Hkv, pages, page_size, d] and table."""
        gi, j = self.cache.layer_group[(layer_idx, CacheKind.KV)]
        g = self.cache.groups[gi]
        kc, vc = g.tensors["k"][j], g.tensors["v"][j]
        slots = self.slot_maps[g.table]
        kc.view(kc.shape[0], -1, kc.shape[-1])[:, slots] = k.transpose(0, 1).to(kc.dtype)
        vc.view(vc.shape[0], -1, vc.shape[-1])[:, slots] = v.transpose(0, 1).to(vc.dtype)
        return kc, vc, g.table

    def store(self, layer_idx: int, spec: CacheSpec, *new: torch.Tensor) -> Context:
        if spec.kind is CacheKind.COMPRESSED:
            return self._store_compressed(layer_idx, spec, new[0])
        if spec.kind is CacheKind.KV:
            kc, vc, table = self._write_kv(layer_idx, *new)
            return Context(self.spans(table), k=kc.flatten(1, 2), v=vc.flatten(1, 2))
        gi, j = self.cache.layer_group[(layer_idx, spec.kind)]   # a missing group is a KeyError: a spec lie
        g = self.cache.groups[gi]
        pages = g.tensors["rows"][j]                               # [pages, page_size, D]
        flat = pages.view(-1, pages.shape[-1])
        flat[self.slot_maps[g.table]] = new[0].to(pages.dtype)
        return Context(self.spans(g.table), rows=flat, pages=pages)

    def _store_compressed(self, layer_idx: int, spec: CompressedKV, new: torch.Tensor) -> Context:
        """new [N, D]: a row per new token, kept where the token completes a compression block. The spans
        list, per sequence, the slots of its completed blocks in block order (CompressedKV's layout)."""
        gi, j = self.cache.layer_group[(layer_idx, spec.kind)]
        g = self.cache.groups[gi]
        pages = g.tensors["rows"][j]                               # [pages, rows_per_page, D]
        flat = pages.view(-1, pages.shape[-1])
        ps, rpp, first, d = self.cache.page_size, pages.shape[1], spec.block_len - 1, spec.stride

        def slot(token_slots: torch.Tensor) -> torch.Tensor:
            return token_slots // ps * rpp + token_slots % ps // d

        done = (self.positions >= first) & ((self.positions - first) % d == 0)
        flat[slot(self.slot_maps[g.table][done])] = new[done].to(flat.dtype)
        spans = [Span(s.rows, slot(s.keys[:, first::d]), None if s.valid is None else s.valid[:, first::d])
                 for s in self.spans(g.table)]
        return Context(spans, rows=flat)

    def spans(self, table: int) -> list[Span]:
        """The table's spans: decode rows batched over their whole block tables (padding masked; the block
        table rides along for kernels that read pages in place), then each prefill run over its slots."""
        if table not in self._spans:
            plan, window = self.plans[table], self.cache.windows[table]
            ps = self.cache.page_size
            out = []
            if len(plan.decode_rows):
                bt, lens = plan.decode_block_table.long(), plan.decode_seq_lens
                dev = bt.device
                grid = (bt[:, :, None] * ps + torch.arange(ps, device=dev)).flatten(1)
                pos = torch.arange(grid.shape[1], device=dev)
                valid = pos < lens[:, None]
                if window is not None:  # pages before the window were released: never read them
                    valid &= pos >= lens[:, None] - window
                out.append(Span(plan.decode_rows[:, None], grid, valid, block_table=plan.decode_block_table,
                                seq_lens=lens))
            for r0, r1, slots in plan.prefill:
                out.append(Span(torch.arange(r0, r1, device=slots.device)[None], slots[None]))
            self._spans[table] = out
        return self._spans[table]

    def recurrent_states(self, layer_idx: int, spec: RecurrentState, like: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """RecurrentState layers: this step's sequences' conv inputs and state matrices, in batch order."""
        pool = self.cache.states
        return pool.conv[layer_idx][self.state_slots], pool.state[layer_idx][self.state_slots]

    def store_recurrent_states(self, layer_idx: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        pool = self.cache.states
        pool.conv[layer_idx][self.state_slots] = conv.to(pool.conv[layer_idx].dtype)
        pool.state[layer_idx][self.state_slots] = state.to(torch.float32)
