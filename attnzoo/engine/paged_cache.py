"""The paged cache: page tables (one BlockPool each), one cache group of page tensors per distinct layer
cache spec (vLLM's KV-cache groups), the recurrent-state pool, page accounting, the radix prefix cache's
glue and the integrity check. Groups that attend to the full context share one page table, each sliding
window has its own; layers that keep a fixed-size state per sequence instead of per-token rows
(RecurrentState: the delta-rule layers) get one state slot per running sequence.

Prefix caching covers every model (docs/engine.md, "Prefix caching for hybrids"): the radix tree is keyed
on the full-context table (a bookkeeping one, with no tensors, when every layer slides or keeps a state);
it also keeps the last window's pages of each sliding table and snapshots of the recurrent states at the
points where a request may be reused: the end of a prompt, a branch point the tree already reaches, every
KEEP_EVERY prompt tokens, and where a sequence ends (windows only: states are snapshotted at keep points).

The engine talks to this class only through page tables and token counts; the layers talk to the per-step
handle built from it (engine/step.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from attnzoo.engine.block_pool import BlockPool
from attnzoo.engine.cache_plan import flat_specs, group_specs, pages_for
from attnzoo.engine.radix_cache import NULL_PAGE, RadixCache
from attnzoo.engine.request import Request
from attnzoo.layers.cache_spec import CacheKind, CacheSpec, RecurrentState

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
    """The layers of one spec and their page tensors, by name: KV has "k" [layers, Hkv, pages, page_size, d]
    and "v" (head-major: see ops/attention/paged.py); LATENT, INDEX_KEYS and ROWS have "rows"
    [layers, pages, page_size, D], one row per token shared by all heads; COMPRESSED has "rows"
    [layers, pages, ceil(page_size / stride), D] (see CompressedKV)."""
    spec: CacheSpec
    layer_ids: list[int]
    pool: BlockPool          # its table's pool (shared with the other groups on that table)
    table: int               # index into PagedKVCache.tables and Request.page_tables
    tensors: dict[str, torch.Tensor]

    @property
    def window(self) -> int | None:
        return self.spec.window

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
    if spec.kind is CacheKind.COMPRESSED:  # one row per completed block: ceil(page_size / stride) per page
        return {"rows": torch.empty(layers, pages, spec.rows_per_page(page_size), spec.dim, dtype=dtype,
                                    device=device)}
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

    def copy(self, src: int, dst: int, into: StatePool | None = None) -> None:
        """Copy every layer's states of slot src into slot dst of `into` (default: this pool)."""
        into = into or self
        for i in self.conv:
            into.conv[i][dst].copy_(self.conv[i][src])
            into.state[i][dst].copy_(self.state[i][src])


class PagedKVCache:
    def __init__(self, specs: list[CacheSpec | tuple[CacheSpec, ...]], num_pages: int, page_size: int,
                 dtype: torch.dtype, enable_prefix_caching: bool = True, device: torch.device | str = "cpu",
                 num_state_slots: int = 0, window_pages: dict[int, int] | None = None, num_snapshots: int = 0,
                 keys_pages: int = 0):
        """num_pages: pages of the full-context table (of every table when window_pages is None);
        window_pages: pages of each sliding window's table (they only ever hold the last window);
        num_snapshots: slots for recurrent-state snapshots at cached prefixes (0: no prefix caching for a
        model with recurrent layers); keys_pages: size of the bookkeeping table that keys the radix tree
        when no layer attends to the full context (0: no prefix caching for such a model)."""
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
        grouped.sort(key=lambda g: g[0].window is not None)
        if enable_prefix_caching and keys_pages and (recurrent or grouped) and (num_snapshots or not recurrent) \
                and all(g[0].window is not None for g in grouped):
            table_of_window[None] = 0
            self.tables.append(PageTable(BlockPool(keys_pages), None, keys_only=True))
        for gi, (spec, layers) in enumerate(grouped):
            window = spec.window
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
        # a hit on a model with recurrent layers restores each layer's state at the prefix from a snapshot
        self.snapshots = StatePool(recurrent, num_snapshots, dtype, self.device) if recurrent and num_snapshots \
            else None
        if enable_prefix_caching:
            if self.states is not None and self.snapshots is None:
                log.info("prefix caching is off: layers %s keep a recurrent state per sequence and no memory is "
                         "planned for snapshots of it", sorted(recurrent))
            elif not self.tables or self.tables[0].window is not None:
                log.info("prefix caching is off: no table keys the radix tree (no full-context layer and no "
                         "bookkeeping table)")
            else:
                self.radix = RadixCache(self.tables[0].pool, page_size, [t.pool for t in self.tables[1:]],
                                        [t.window for t in self.tables[1:]], self._release_snapshot)

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
                req.state_slot = self.states.take()
                if req.state_slot is None:  # no state slot free now: allocate() will refuse it anyway
                    return
            assert hit.snapshot is not None and self.snapshots is not None
            self.snapshots.copy(hit.snapshot, req.state_slot, into=self.states)
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
        self.states.copy(req.state_slot, slot, into=self.snapshots)
        if not self.radix.set_snapshot(ids, slot):  # another request snapshotted this point first
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
            lines.append(f"recurrent state (layers {_ranges(sorted(self.states.conv))}): {self.states.num_slots} slots"
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
