"""The paged cache's accounting (rank 0 only; it holds no tensor): page tables (one BlockPool each), which
cache group of layers uses which table, the recurrent-state and snapshot slots, the radix prefix cache's
glue and the integrity check. Groups that attend to the full context share one page table, each sliding
window has its own; layers that keep a fixed-size state per sequence instead of per-token rows
(RecurrentState: the delta-rule layers) get one state slot per running sequence.

The tensors live on every rank (`CacheTensors`, engine/cache_tensors.py, each rank its head shard). What this
class would do to them it records instead, in one list in the order it happens: zero the pages it hands out
and the state slots it gives a sequence, copy a state into a snapshot slot at a keep point and a snapshot
into a sequence's slot on a hit. `take_ops` drains the list once per step; the step carries it to every rank.

Prefix caching covers every model (docs/engine.md, "Prefix caching for hybrids"): the radix tree is keyed
on the full-context table (a bookkeeping one, with no tensors, when every layer slides or keeps a state);
it also keeps the last window's pages of each sliding table and snapshots of the recurrent states at the
points where a request may be reused: the end of a prompt, a branch point the tree already reaches, every
KEEP_EVERY prompt tokens, and where a sequence ends (windows only: states are snapshotted at keep points).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from attnzoo.engine.block_pool import BlockPool
from attnzoo.engine.cache_plan import group_specs, pages_for, recurrent_specs
from attnzoo.engine.cache_tensors import CacheLayout, CacheOp, RestoreState, SaveState, ZeroPages, ZeroState
from attnzoo.engine.radix_cache import NULL_PAGE, RadixCache
from attnzoo.engine.request import Request
from attnzoo.layers.cache_spec import CacheSpec

log = logging.getLogger("attnzoo.engine")
# hybrids: a long prompt also keeps its window pages and states every KEEP_EVERY tokens, so that a prefix
# other requests will share is found by the first request that computes it (to within KEEP_EVERY tokens),
# not only by the second (which would stop at the branch point it finds). Cost: one state snapshot and a
# window of pages per KEEP_EVERY prompt tokens, LRU-evicted like the rest of the tree.
KEEP_EVERY = 512


@dataclass
class PageTable:
    """One kind of page table: every full-attention spec shares one (a page id then addresses the same
    tokens in each of them, so the radix tree covers them all); each sliding window gets its own, whose
    pages are released as they leave the window."""
    pool: BlockPool
    window: int | None
    keys_only: bool = False  # the radix tree's bookkeeping table of a model without full-context layers


@dataclass
class CacheGroup:
    """The layers of one spec (their tensors: `CacheTensors.groups`, same order) and their page table."""
    spec: CacheSpec
    layer_ids: list[int]
    pool: BlockPool          # its table's pool (shared with the other groups on that table)
    table: int               # index into PagedKVCache.tables and Request.page_tables

    @property
    def window(self) -> int | None:
        return self.spec.window


class SlotPool:
    """Numbered slots (recurrent states, or their snapshots) with a free stack: the most recently given back
    is taken first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))

    def take(self) -> int | None:
        return self.free_slots.pop() if self.free_slots else None

    def give_back(self, slot: int) -> None:
        if slot in self.free_slots or not 0 <= slot < self.num_slots:
            raise AssertionError(f"slot {slot} released twice or out of range")
        self.free_slots.append(slot)


class PagedKVCache:
    def __init__(self, specs: list[CacheSpec | tuple[CacheSpec, ...]], num_pages: int, page_size: int,
                 enable_prefix_caching: bool = True, num_state_slots: int = 0,
                 window_pages: dict[int, int] | None = None, num_snapshots: int = 0, keys_pages: int = 0):
        """num_pages: pages of the full-context table (of every table when window_pages is None);
        window_pages: pages of each sliding window's table (they only ever hold the last window);
        num_snapshots: slots for recurrent-state snapshots at cached prefixes (0: no prefix caching for a
        model with recurrent layers); keys_pages: size of the bookkeeping table that keys the radix tree
        when no layer attends to the full context (0: no prefix caching for such a model)."""
        self.page_size, self.num_pages = page_size, num_pages
        self.ops: list[CacheOp] = []   # what the ranks' tensors must do before the next forward, in order
        self.stash = False   # recurrent layers under speculative decoding: a copy of the states drafts run on
        recurrent = recurrent_specs(specs)
        if recurrent and num_state_slots < 1:
            raise ValueError("this model has recurrent-state layers: give the cache num_state_slots >= 1")
        self.state_layers = sorted(recurrent)
        self.states = SlotPool(num_state_slots) if recurrent else None
        self.tables: list[PageTable] = []
        table_of_window: dict[int | None, int] = {}
        self.groups: list[CacheGroup] = []
        grouped = group_specs(specs)   # the full-context table first (index 0: the radix tree's), then windows
        if enable_prefix_caching and keys_pages and (recurrent or grouped) and (num_snapshots or not recurrent) \
                and all(g[0].window is not None for g in grouped):
            table_of_window[None] = 0
            self.tables.append(PageTable(BlockPool(keys_pages), None, keys_only=True))
        for spec, layers in grouped:
            window = spec.window
            if window not in table_of_window:
                table_of_window[window] = len(self.tables)
                n = num_pages if window is None or window_pages is None else window_pages[window]
                self.tables.append(PageTable(BlockPool(n), window))
            ti = table_of_window[window]
            self.groups.append(CacheGroup(spec, layers, self.tables[ti].pool, ti))
        for ti, t in enumerate(self.tables):
            if t.pool.capacity:
                self._zero_pages(ti, [0])  # gather plans pad short page lists with page 0
        self.radix: RadixCache | None = None
        # a hit on a model with recurrent layers restores each layer's state at the prefix from a snapshot
        self.snapshots = SlotPool(num_snapshots) if recurrent and num_snapshots else None
        if enable_prefix_caching:
            if self.states is not None and self.snapshots is None:
                log.info("prefix caching is off: layers %s keep a recurrent state per sequence and no memory is "
                         "planned for snapshots of it", self.state_layers)
            elif not self.tables or self.tables[0].window is not None:
                log.info("prefix caching is off: no table keys the radix tree (no full-context layer and no "
                         "bookkeeping table)")
            else:
                self.radix = RadixCache(self.tables[0].pool, page_size, [t.pool for t in self.tables[1:]],
                                        [t.window for t in self.tables[1:]], self._release_snapshot)

    @property
    def layout(self) -> CacheLayout:
        """What every rank builds its `CacheTensors` from."""
        return CacheLayout(self.page_size, [t.window for t in self.tables],
                           [(g.layer_ids, g.table, g.pool.capacity) for g in self.groups],
                           self.states.num_slots if self.states else 0,
                           self.snapshots.num_slots if self.snapshots else 0, self.stash)

    def take_ops(self) -> list[CacheOp]:
        """The tensor instructions recorded since the last call, in order (once per step)."""
        ops, self.ops = self.ops, []
        return ops

    @property
    def hybrid(self) -> bool:
        """The prefix cache keeps window pages or states at chosen points (see keep_at), not only pages."""
        return self.radix is not None and (bool(self.radix.side_pools) or self.snapshots is not None)

    # ---- page accounting ------------------------------------------------------------------------
    def pages_needed(self, req: Request, num_tokens: int) -> list[int]:
        """New pages each group needs so that req's tables cover num_tokens tokens."""
        want = -(-num_tokens // self.page_size)
        tables = req.page_tables or [[] for _ in self.tables]
        return [max(0, want - len(t)) for t in tables]

    def _ensure_free(self, need: list[int]) -> bool:
        for ti, (t, n) in enumerate(zip(self.tables, need)):
            if t.pool.num_free < n and self.radix is not None:
                if ti == 0:
                    self.radix.evict(n - t.pool.num_free)
                else:  # window pages the tree keeps for hits: tombstone the least recently used
                    self.radix.evict_side(ti - 1, n - t.pool.num_free)
            if t.pool.num_free < n:
                return False
        return True

    def chunk(self, req: Request, n: int) -> int:
        """How many of n new tokens req computes this step: a prefill stops at its next keep point, so the
        window pages and the states there still exist when the step ends and the tree takes them."""
        later = [p for p in req.keep_at if p > req.num_computed]
        return min(n, min(later) - req.num_computed) if later else n

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
            req.state_slot = self._take_state()
        return True

    def _zero_pages(self, table: int, pages: list[int]) -> None:
        """Pages handed out are cleared before they are read (`ZeroPages`); a bookkeeping table has no tensors."""
        if pages and not self.tables[table].keys_only:
            self.ops.append(ZeroPages(table, tuple(pages)))

    def _take_state(self) -> int | None:
        """A free state slot, zeroed before the next forward (a sequence starts from the zero state)."""
        slot = self.states.take()
        if slot is not None:
            self.ops.append(ZeroState(slot))
        return slot

    def match_prefix(self, req: Request) -> None:
        """Adopt the longest cached prefix of req's tokens that every cache group can serve (the last token
        is always computed). With recurrent layers the hit ends at a snapshot, copied into req's state slot.
        Hybrids also choose where req's window pages and states will be kept: where its prompt's last page
        ends, where the tree's pages for it end beyond the hit (a branch point others share), and every
        KEEP_EVERY tokens of the prompt."""
        if self.radix is None or req.num_computed:
            return
        ids = req.all_ids()[: req.num_tokens - 1]
        hit = self.radix.match(ids, need_snapshot=self.snapshots is not None)
        if self.hybrid:
            ps = self.page_size
            end, every = len(ids) // ps * ps, max(ps, KEEP_EVERY // ps * ps)
            req.keep_at = {p for p in (end, hit.reachable // ps * ps, *range(every, end, every)) if p > hit.tokens}
        if not hit.tokens:
            return
        if self.states is not None:
            if req.state_slot is None:
                req.state_slot = self._take_state()
                if req.state_slot is None:  # no state slot free now: allocate() will refuse it anyway
                    return
            assert hit.snapshot is not None and self.snapshots is not None
            self.ops.append(RestoreState(hit.snapshot, req.state_slot))
        self.radix.lock(hit.node)
        self.tables[0].pool.incref(hit.pages)
        for t, pages in zip(self.tables[1:], hit.side):
            t.pool.incref([p for p in pages if p != NULL_PAGE])
        req.page_tables = [list(hit.pages), *(list(s) for s in hit.side)]
        req.prefix_handle, req.tree_tokens = hit.node, hit.tokens
        req.num_computed = hit.tokens

    def cache_prefix(self, req: Request, final: bool = False) -> None:
        """Insert req's computed, page-aligned tokens into the radix tree; pages the tree already had are
        swapped for the tree's (ours are released), and the lock moves to the new, deeper node. At a keep
        point (and when req ends: `final`) the tree also takes the last window's pages of each sliding table
        and, at a keep point, a snapshot of req's recurrent states."""
        if self.radix is None:
            return
        ps = self.page_size
        n = (min(req.num_computed, req.num_tokens - 1) // ps) * ps
        if n <= req.tree_tokens:
            return
        ids, table = req.all_ids()[:n], req.page_tables[0]
        keep = n == req.num_computed and n in req.keep_at
        side = []
        for t, pages in zip(self.tables[1:], req.page_tables[1:]):
            first = max(0, n - t.window + 1) // ps if keep or final else n // ps  # type: ignore[operator]
            side.append([NULL_PAGE] * first + pages[first: n // ps])
        already = self.radix.insert(ids, table[: n // ps], side)
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
        if keep and self.snapshots is not None:
            self._snapshot(req, ids)

    def _snapshot(self, req: Request, ids: list[int]) -> None:
        """Keep req's recurrent states after `ids` (its computed tokens, just cached) at that tree node."""
        assert self.snapshots is not None and self.states is not None and self.radix is not None
        if not self.snapshots.free_slots:
            self.radix.evict_snapshots(1)
        slot = self.snapshots.take()
        if slot is None:
            return
        if self.radix.set_snapshot(ids, slot):
            self.ops.append(SaveState(req.state_slot, slot))
        else:  # another request snapshotted this point first
            self.snapshots.give_back(slot)

    def _release_snapshot(self, slot: int) -> None:
        assert self.snapshots is not None
        self.snapshots.give_back(slot)

    def release_window(self, req: Request) -> None:
        """Sliding groups: free pages whose every position is before the next query's window."""
        # with a prefix cache, keep the window before the last page boundary: cache_prefix(final=True) gives
        # it to the tree when req ends (pages_for counts that page)
        end = req.num_computed // self.page_size * self.page_size if self.radix is not None else req.num_computed
        for t, table in zip(self.tables, req.page_tables):
            if t.window is None:
                continue
            first_visible = end - t.window + 1
            for i in range(min(len(table), max(0, first_visible) // self.page_size)):
                if table[i] != NULL_PAGE:
                    t.pool.decref([table[i]])
                    table[i] = NULL_PAGE

    def free(self, req: Request) -> None:
        """Drop every page reference req holds and its prefix lock (finish, abort, preemption)."""
        if self.radix is not None and req.page_tables:
            self.cache_prefix(req, final=True)  # keep its KV for future hits
        for t, table in zip(self.tables, req.page_tables):
            t.pool.decref([p for p in table if p != NULL_PAGE])
        if req.prefix_handle is not None:
            self.radix.unlock(req.prefix_handle)
        if req.state_slot is not None:
            self.states.give_back(req.state_slot)
        req.page_tables, req.prefix_handle, req.tree_tokens, req.state_slot = [], None, 0, None
        req.keep_at = set()

    def pages_short(self, num_tokens: int, chunk: int = 0) -> tuple[int, int] | None:
        """(pages needed, pages held) of the first table too small for one sequence of num_tokens tokens
        prefilled in chunks of `chunk` tokens (a sliding table holds its window plus a chunk), or None."""
        for t in self.tables:
            need = pages_for(t.window, num_tokens, self.page_size)
            if t.window is not None:
                need = min(-(-num_tokens // self.page_size), need + -(-chunk // self.page_size))
            if need > t.pool.capacity:
                return need, t.pool.capacity
        return None

    def max_concurrency(self, num_tokens: int) -> int:
        """How many sequences of num_tokens tokens fit at once (pages and state slots)."""
        fits = [t.pool.capacity // max(1, pages_for(t.window, num_tokens, self.page_size)) for t in self.tables
                if not t.keys_only]
        if self.states is not None:
            fits.append(self.states.num_slots)
        return min(fits) if fits else 0

    def describe(self) -> list[str]:
        """One line per page table (and the state pool) for the start-up log."""
        lines = []
        for t in self.tables:
            if t.keys_only:
                lines.append(f"prefix-cache keys (no tensors): {t.pool.capacity} pages x {self.page_size} tokens")
                continue
            layers = sorted({i for g in self.groups if g.pool is t.pool for i in g.layer_ids})
            kind = "full context" if t.window is None else f"sliding window {t.window}"
            lines.append(f"{kind} (layers {_ranges(layers)}): {t.pool.capacity} pages x {self.page_size} tokens = "
                         f"{t.pool.capacity * self.page_size} tokens")
        if self.states is not None:
            lines.append(f"recurrent state (layers {_ranges(self.state_layers)}): {self.states.num_slots} slots"
                         + (f", {self.snapshots.num_slots} prefix-cache snapshots" if self.snapshots else ""))
        return lines

    @property
    def usage(self) -> float:
        tables = [t for t in self.tables if not t.keys_only]
        used = sum(t.pool.capacity - t.pool.num_free for t in tables)
        total = sum(t.pool.capacity for t in tables)
        if self.radix is not None and not self.tables[0].keys_only:
            used -= self.radix.evictable_pages
        if self.states is not None:  # a state slot counts as one unit of memory, like a page
            used += self.states.num_slots - len(self.states.free_slots)
            total += self.states.num_slots
        return used / max(total, 1)

    def check_integrity(self, running: list[Request]) -> None:
        """Every page reference is accounted for: free + evictable + protected + request-private == capacity,
        and each page's ref count equals the references the tree and the running requests hold (window pages
        included). Every state slot is free or held by exactly one running request; every snapshot slot is
        free or owned by exactly one tree node."""
        if self.states is not None:
            held = [r.state_slot for r in running if r.state_slot is not None]
            if len(set(held)) != len(held) or set(held) & set(self.states.free_slots) or \
                    len(held) + len(self.states.free_slots) != self.states.num_slots:
                raise AssertionError(f"state slots: held {sorted(held)}, free {sorted(self.states.free_slots)}, "
                                     f"capacity {self.states.num_slots}")
        if self.snapshots is not None:
            tree = self.radix.snapshots if self.radix is not None else 0
            free = self.snapshots.free_slots
            if len(set(free)) != len(free) or tree + len(free) != self.snapshots.num_slots:
                raise AssertionError(f"snapshots: {tree} in the tree, {len(free)} free, "
                                     f"capacity {self.snapshots.num_slots}")
        if self.radix is not None:
            self.radix.check_integrity()
        for gi, g in enumerate(self.tables):
            g.pool.check()
            expected = [0] * g.pool.capacity
            tree_pages = set()
            if self.radix is not None:
                tree_pages = self.radix.pages_of() if gi == 0 else self.radix.side_pages_of(gi - 1)
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
