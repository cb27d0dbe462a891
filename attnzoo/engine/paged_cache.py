"""The paged cache: page tables (one BlockPool each), one cache group of page tensors per distinct layer
cache spec (vLLM's KV-cache groups), the recurrent-state pool, page accounting, the radix prefix cache's
glue and the integrity check. Groups that attend to the full context share one page table, each sliding
window has its own; layers that keep a fixed-size state per sequence instead of per-token rows
(RecurrentState: the delta-rule layers) get one state slot per running sequence.

The engine talks to this class only through page tables and token counts; the layers talk to the per-step
handle built from it (engine/step.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from attnzoo.engine.block_pool import BlockPool
from attnzoo.engine.cache_plan import flat_specs, group_specs, pages_for
from attnzoo.engine.radix_cache import RadixCache
from attnzoo.engine.request import Request
from attnzoo.layers.cache_spec import CacheKind, CacheSpec, RecurrentState, SlidingKV

log = logging.getLogger("attnzoo.engine")
NULL_PAGE = -1  # a page released because it left the sliding window (vLLM's null block)


@dataclass
class PageTable:
    """One kind of page table: every full-attention spec shares one (a page id then addresses the same
    tokens in each of them, so the radix tree covers them all); each sliding window gets its own, whose
    pages are released as they leave the window."""
    pool: BlockPool
    window: int | None


@dataclass
class CacheGroup:
    """The layers of one spec and their page tensors, by name: KV has "k" [layers, Hkv, pages, page_size, d]
    and "v" (head-major: see ops/attention/paged.py); LATENT and INDEX_KEYS have "rows"
    [layers, pages, page_size, D], one row per token shared by all heads."""
    spec: CacheSpec
    layer_ids: list[int]
    pool: BlockPool          # its table's pool (shared with the other groups on that table)
    table: int               # index into PagedKVCache.tables and Request.page_tables
    tensors: dict[str, torch.Tensor]

    @property
    def window(self) -> int | None:
        return self.spec.window if isinstance(self.spec, SlidingKV) else None

    @property
    def pages_axis(self) -> int:
        return 2 if self.spec.kind is CacheKind.KV else 1

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def group_tensors(spec: CacheSpec, layers: int, pages: int, page_size: int, dtype: torch.dtype,
                  device: torch.device | str) -> dict[str, torch.Tensor]:
    """Uninitialised: the OS backs a page with memory only when it is first written, so a cache sized for
    the worst case costs what is used; PagedKVCache._zero_pages clears each page as it is handed out."""
    if spec.kind is CacheKind.KV:
        shape = (layers, spec.num_kv_heads, pages, page_size)
        return {"k": torch.empty(*shape, spec.head_dim, dtype=dtype, device=device),
                "v": torch.empty(*shape, spec.v_head_dim or spec.head_dim, dtype=dtype, device=device)}
    return {"rows": torch.empty(layers, pages, page_size, spec.dim, dtype=dtype, device=device)}


class StatePool:
    """Fixed-size per-sequence states in slots: [slots, conv_dim, K-1] conv inputs (model dtype) and
    [slots, H, dk, dv] float32 state matrices per recurrent layer. The slots start uninitialised (memory
    of a slot never taken is never touched); a slot is zeroed when taken, so a sequence starts from the
    zero state; preemption (recompute) and finishing give it back."""

    def __init__(self, specs: dict[int, RecurrentState], num_slots: int, dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.conv = {i: torch.empty(num_slots, s.conv_dim, s.conv_width - 1, dtype=dtype, device=device)
                     for i, s in specs.items()}
        self.state = {i: torch.empty(num_slots, s.num_heads, s.k_dim, s.v_dim, dtype=torch.float32, device=device)
                      for i, s in specs.items()}

    def take(self) -> int | None:
        if not self.free_slots:
            return None
        slot = self.free_slots.pop()
        for t in (*self.conv.values(), *self.state.values()):
            t[slot].zero_()
        return slot

    def give_back(self, slot: int) -> None:
        if slot in self.free_slots or not 0 <= slot < self.num_slots:
            raise AssertionError(f"state slot {slot} released twice or out of range")
        self.free_slots.append(slot)


class PagedKVCache:
    def __init__(self, specs: list[CacheSpec | tuple[CacheSpec, ...]], num_pages: int, page_size: int,
                 dtype: torch.dtype, enable_prefix_caching: bool = True, device: torch.device | str = "cpu",
                 num_state_slots: int = 0, window_pages: dict[int, int] | None = None):
        """num_pages: pages of the full-context table (of every table when window_pages is None);
        window_pages: pages of each sliding window's table (they only ever hold the last window)."""
        self.page_size, self.num_pages, self.device = page_size, num_pages, torch.device(device)
        # under tensor parallelism rank 0 records the pages and state slots it zeroes, so that the workers,
        # whose caches hold the other head shards, zero the same ones before the step (None: not recorded)
        self.fresh: tuple[list[tuple[int, list[int]]], list[int]] | None = None
        recurrent = {i: s for i, s in flat_specs(specs) if s.kind is CacheKind.STATE}
        if recurrent and num_state_slots < 1:
            raise ValueError("this model has recurrent-state layers: give the cache num_state_slots >= 1")
        self.states = StatePool(recurrent, num_state_slots, dtype, self.device) if recurrent else None
        self.tables: list[PageTable] = []
        table_of_window: dict[int | None, int] = {}
        self.groups: list[CacheGroup] = []
        self.layer_group: dict[tuple[int, CacheKind], tuple[int, int]] = {}
        grouped = group_specs(specs)
        # the full-context table first (index 0: the radix tree's), then one per window
        grouped.sort(key=lambda g: isinstance(g[0], SlidingKV))
        for gi, (spec, layers) in enumerate(grouped):
            window = spec.window if isinstance(spec, SlidingKV) else None
            if window not in table_of_window:
                table_of_window[window] = len(self.tables)
                n = num_pages if window is None or window_pages is None else window_pages[window]
                self.tables.append(PageTable(BlockPool(n), window))
            ti = table_of_window[window]
            pages = self.tables[ti].pool.capacity
            tensors = group_tensors(spec, len(layers), pages, page_size, dtype, device)
            self.groups.append(CacheGroup(spec, layers, self.tables[ti].pool, ti, tensors))
            for j, layer in enumerate(layers):
                self.layer_group[(layer, spec.kind)] = (gi, j)
        for ti, t in enumerate(self.tables):
            if t.pool.capacity:
                self._zero_pages(ti, [0])  # gather plans pad short page lists with page 0
        self.radix: RadixCache | None = None
        if enable_prefix_caching:
            if self.states is not None:
                # a cached prefix would also need each recurrent layer's state at that token (SGLang keeps
                # Mamba snapshots at page boundaries); without snapshots a hit would skip the state's update
                log.info("prefix caching is off: layers %s keep a recurrent state per sequence, which the "
                         "radix cache cannot restore at a prefix boundary", sorted(recurrent))
            elif len(self.tables) == 1 and self.tables[0].window is None:
                self.radix = RadixCache(self.tables[0].pool, page_size)
            else:
                log.info("prefix caching is off: the radix cache covers models whose layers all attend to the "
                         "full context; this model has sliding windows %s",
                         [t.window for t in self.tables if t.window is not None])

    # ---- page accounting ------------------------------------------------------------------------
    def pages_needed(self, req: Request, num_tokens: int) -> list[int]:
        """New pages each group needs so that req's tables cover num_tokens tokens."""
        want = -(-num_tokens // self.page_size)
        tables = req.page_tables or [[] for _ in self.tables]
        return [max(0, want - len(t)) for t in tables]

    def _ensure_free(self, need: list[int]) -> bool:
        for t, n in zip(self.tables, need):
            if t.pool.num_free < n and self.radix is not None and t.pool is self.radix.pool:
                self.radix.evict(n - t.pool.num_free)
            if t.pool.num_free < n:
                return False
        return True

    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow req's page tables to cover num_tokens tokens, evicting cached prefixes if needed.
        All tables (and the state slot) or none: on failure nothing changes."""
        if not req.page_tables:
            req.page_tables = [[] for _ in self.tables]
        need = self.pages_needed(req, num_tokens)
        if self.states is not None and req.state_slot is None and not self.states.free_slots:
            return False
        if not self._ensure_free(need):
            return False
        for ti, (t, table, n) in enumerate(zip(self.tables, req.page_tables, need)):
            pages = t.pool.allocate(n)
            self._zero_pages(ti, pages)
            table.extend(pages)
        if self.states is not None and req.state_slot is None:
            req.state_slot = self.states.take()
            if self.fresh is not None:
                self.fresh[1].append(req.state_slot)
        return True

    def _zero_pages(self, table: int, pages: list[int]) -> None:
        """Clear pages as they are handed out. Decode gathers whole pages and masks the slots past a
        sequence's end, but a masked slot still meets its value in `probs @ V` (0 * NaN = NaN), so no slot
        a sequence can read may hold uninitialised memory or another sequence's NaN."""
        if not pages:
            return
        if self.fresh is not None:
            self.fresh[0].append((table, list(pages)))
        idx = torch.tensor(pages, dtype=torch.long, device=self.device)
        for g in self.groups:
            if g.table == table:
                for t in g.tensors.values():
                    t.index_fill_(g.pages_axis, idx, 0)

    def drain_fresh(self) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """(pages per table, state slots) zeroed since the last call (empty unless recording)."""
        if self.fresh is None:
            return [], []
        out, self.fresh = self.fresh, ([], [])
        return out

    def zero_fresh(self, pages: list[tuple[int, list[int]]], slots: list[int]) -> None:
        """A tensor-parallel worker's cache: zero what rank 0 zeroed when it handed these out."""
        for table, ps in pages:
            self._zero_pages(table, ps)
        for slot in slots:
            for t in (*self.states.conv.values(), *self.states.state.values()):
                t[slot].zero_()

    def match_prefix(self, req: Request) -> None:
        """Adopt the longest cached prefix of req's tokens (the last token is always computed)."""
        if self.radix is None or req.num_computed:
            return
        ids = req.all_ids()[: req.num_tokens - 1]
        pages, handle = self.radix.match_prefix(ids)
        if not pages:
            return
        self.radix.lock(handle)
        self.tables[0].pool.incref(pages)
        req.page_tables = [list(pages)]
        req.prefix_handle, req.tree_tokens = handle, len(pages) * self.page_size
        req.num_computed = req.tree_tokens

    def cache_prefix(self, req: Request) -> None:
        """Insert req's computed, page-aligned tokens into the radix tree; pages the tree already had are
        swapped for the tree's (ours are released), and the lock moves to the new, deeper node."""
        if self.radix is None:
            return
        n = (min(req.num_computed, req.num_tokens - 1) // self.page_size) * self.page_size
        if n <= req.tree_tokens:
            return
        ids, table = req.all_ids()[:n], req.page_tables[0]
        already = self.radix.insert(ids, table[: n // self.page_size])
        pool = self.tables[0].pool
        if already > req.tree_tokens:  # another request cached this range first: use its pages
            tree_pages, _ = self.radix.match_prefix(ids[:already])
            lo, hi = req.tree_tokens // self.page_size, already // self.page_size
            for i in range(lo, hi):
                if table[i] != tree_pages[i]:
                    pool.incref([tree_pages[i]])
                    pool.decref([table[i]])
                    table[i] = tree_pages[i]
        _, handle = self.radix.match_prefix(ids)
        self.radix.lock(handle)
        if req.prefix_handle is not None:
            self.radix.unlock(req.prefix_handle)
        req.prefix_handle, req.tree_tokens = handle, n

    def release_window(self, req: Request) -> None:
        """Sliding groups: free pages whose every position is before the next query's window."""
        for t, table in zip(self.tables, req.page_tables):
            if t.window is None:
                continue
            first_visible = req.num_computed - t.window + 1
            for i in range(min(len(table), max(0, first_visible) // self.page_size)):
                if table[i] != NULL_PAGE:
                    t.pool.decref([table[i]])
                    table[i] = NULL_PAGE

    def free(self, req: Request) -> None:
        """Drop every page reference req holds and its prefix lock (finish, abort, preemption)."""
        if self.radix is not None and req.page_tables:
            self.cache_prefix(req)  # keep its KV for future hits
        for t, table in zip(self.tables, req.page_tables):
            t.pool.decref([p for p in table if p != NULL_PAGE])
        if req.prefix_handle is not None:
            self.radix.unlock(req.prefix_handle)
        if req.state_slot is not None:
            self.states.give_back(req.state_slot)
        req.page_tables, req.prefix_handle, req.tree_tokens, req.state_slot = [], None, 0, None

    def max_concurrency(self, num_tokens: int) -> int:
        """How many sequences of num_tokens tokens fit at once (pages and state slots)."""
        fits = [t.pool.capacity // max(1, pages_for(t.window, num_tokens, self.page_size)) for t in self.tables]
        if self.states is not None:
            fits.append(self.states.num_slots)
        return min(fits) if fits else 0

    def describe(self) -> list[str]:
        """One line per page table (and the state pool) for the start-up log."""
        lines = []
        for t in self.tables:
            layers = sorted({i for g in self.groups if g.pool is t.pool for i in g.layer_ids})
            kind = "full context" if t.window is None else f"sliding window {t.window}"
            lines.append(f"{kind} (layers {_ranges(layers)}): {t.pool.capacity} pages x {self.page_size} tokens = "
                         f"{t.pool.capacity * self.page_size} tokens")
        if self.states is not None:
            lines.append(f"recurrent state (layers {_ranges(sorted(self.states.conv))}): {self.states.num_slots} slots")
        return lines

    @property
    def usage(self) -> float:
        used = sum(t.pool.capacity - t.pool.num_free for t in self.tables)
        total = sum(t.pool.capacity for t in self.tables)
        if self.radix is not None:
            used -= self.radix.evictable_pages
        if self.states is not None:  # a state slot counts as one unit of memory, like a page
            used += self.states.num_slots - len(self.states.free_slots)
            total += self.states.num_slots
        return used / max(total, 1)

    def check_integrity(self, running: list[Request]) -> None:
        """Every page reference is accounted for: free + evictable + protected + request-private == capacity,
        and each page's ref count equals the references the tree and the running requests hold. Every state
        slot is free or held by exactly one running request."""
        if self.states is not None:
            held = [r.state_slot for r in running if r.state_slot is not None]
            if len(set(held)) != len(held) or set(held) & set(self.states.free_slots) or \
                    len(held) + len(self.states.free_slots) != self.states.num_slots:
                raise AssertionError(f"state slots: held {sorted(held)}, free {sorted(self.states.free_slots)}, "
                                     f"capacity {self.states.num_slots}")
        for gi, g in enumerate(self.tables):
            g.pool.check()
            expected = [0] * g.pool.capacity
            tree_pages = set()
            if self.radix is not None and gi == 0:
                self.radix.check_integrity()
                tree_pages = self.radix.pages_of()
                for p in tree_pages:
                    expected[p] += 1
            for r in running:
                for p in (r.page_tables[gi] if r.page_tables else []):
                    if p != NULL_PAGE:
                        expected[p] += 1
            actual = [g.pool.ref(p) for p in range(g.pool.capacity)]
            if actual != expected:
                bad = [p for p in range(g.pool.capacity) if actual[p] != expected[p]][:5]
                raise AssertionError(f"table {gi}: page refs differ from holders at pages {bad}: "
                                     f"refs {[actual[p] for p in bad]} vs holders {[expected[p] for p in bad]}")
            private = sum(1 for p in range(g.pool.capacity) if expected[p] and p not in tree_pages)
            cached = len(tree_pages)
            if g.pool.num_free + cached + private != g.pool.capacity:
                raise AssertionError(f"table {gi}: free {g.pool.num_free} + cached {cached} + private {private} "
                                     f"!= capacity {g.pool.capacity}")


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)
