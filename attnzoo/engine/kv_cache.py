"""Paged KV memory: one cache group per distinct layer cache spec (vLLM's KV-cache groups) with per-layer
page tensors; groups that attend to the full context share one page table (one BlockPool), each sliding
window has its own; the radix prefix cache over the full-context table; and a state
pool for layers that keep a fixed-size state per sequence instead of per-token KV (RecurrentState: the
delta-rule layers), one slot per running sequence.

The engine talks to this class only through page tables and token counts; the layers talk to the
`StepKV` handle it builds each step (`Batch.cache`), which stores new K/V and runs paged attention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from attnzoo.engine.block_pool import BlockPool
from attnzoo.engine.radix_cache import RadixCache
from attnzoo.engine.request import Request
from attnzoo.layers.batch import Batch
from attnzoo.layers.cache_spec import CacheSpec, FullKV, IndexerKeys, LatentKV, RecurrentState, SlidingKV
from attnzoo.ops.attention.paged import PagedPlan, paged_attention_planned, plan_paged

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
    spec: CacheSpec
    layer_ids: list[int]
    pool: BlockPool          # its table's pool (shared with the other groups on that table)
    table: int               # index into PagedKVCache.tables and Request.page_tables
    k: torch.Tensor          # [layers_in_group, Hkv, pages, page_size, d] (head-major: see ops/attention/paged.py)
    v: torch.Tensor

    @property
    def window(self) -> int | None:
        return self.spec.window if isinstance(self.spec, SlidingKV) else None


def flat_specs(specs: list[CacheSpec | tuple[CacheSpec, ...]]) -> list[tuple[int, CacheSpec]]:
    """(layer, spec) pairs: a layer may declare several specs (DSA: a latent and indexer keys)."""
    return [(i, s) for i, entry in enumerate(specs) for s in (entry if isinstance(entry, tuple) else (entry,))]


def spec_kind(spec: CacheSpec) -> str:
    return "latent" if isinstance(spec, LatentKV) else "indexer" if isinstance(spec, IndexerKeys) else "kv"


def group_specs(specs: list[CacheSpec | tuple[CacheSpec, ...]]) -> list[tuple[CacheSpec, list[int]]]:
    """Paged groups: layers with equal per-token specs share page tensors (recurrent layers have none)."""
    groups: dict[CacheSpec, list[int]] = {}
    for i, s in flat_specs(specs):
        if isinstance(s, RecurrentState):
            continue
        if not isinstance(s, (FullKV, LatentKV, IndexerKeys)):  # SlidingKV is a FullKV
            raise NotImplementedError(f"layer {i}: the engine has no cache group for {type(s).__name__} yet")
        groups.setdefault(s, []).append(i)
    return list(groups.items())


def page_bytes(specs: list[CacheSpec | tuple[CacheSpec, ...]], page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page costs across all layers (each table gets the same number of pages)."""
    return sum(s.bytes_per_token(torch.finfo(dtype).bits // 8) for _, s in flat_specs(specs)) * page_size


def table_page_bytes(specs: list[CacheSpec | tuple[CacheSpec, ...]], page_size: int, dtype: torch.dtype
                     ) -> dict[int | None, int]:
    """Bytes one page costs per page table: full-context specs share table None, each window its own."""
    out: dict[int | None, int] = {}
    for _, s in flat_specs(specs):
        if isinstance(s, RecurrentState):
            continue
        w = s.window if isinstance(s, SlidingKV) else None
        out[w] = out.get(w, 0) + s.bytes_per_token(torch.finfo(dtype).bits // 8) * page_size
    return out


def pages_for(window: int | None, num_tokens: int, page_size: int) -> int:
    """Pages one sequence of num_tokens tokens holds at most in a table (full context, or a window)."""
    full = -(-num_tokens // page_size)
    return full if window is None else min(full, -(-(window - 1) // page_size) + 2)


@dataclass
class CachePlan:
    """How a memory budget splits into page tables (and recurrent-state slots)."""
    page_size: int
    num_pages: int                        # the full-context table (every table when window_pages is None)
    window_pages: dict[int, int] | None   # pages of each sliding window's table
    table_bytes: dict[int | None, int]    # bytes of one page of each table
    state_slots: int
    state_bytes: int                      # per slot

    def tables(self) -> dict[int | None, int]:
        return {w: self.num_pages if self.window_pages is None or w is None else self.window_pages[w]
                for w in self.table_bytes}

    @property
    def total_bytes(self) -> int:
        return sum(n * self.table_bytes[w] for w, n in self.tables().items()) + self.state_slots * self.state_bytes

    def max_concurrency(self, num_tokens: int) -> int:
        """Sequences of num_tokens tokens that fit at once."""
        fits = [n // max(1, pages_for(w, num_tokens, self.page_size)) for w, n in self.tables().items()]
        return min(fits + ([self.state_slots] if self.state_bytes else []), default=0)


def plan_cache(specs: list[CacheSpec | tuple[CacheSpec, ...]], page_size: int, dtype: torch.dtype, budget: int,
               max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> CachePlan:
    """Split `budget` bytes: recurrent states of max_num_seqs sequences first; then, for SWA/global hybrids,
    each sliding table gets the pages that as many max_model_len-token sequences as the memory holds can
    use (a window each, plus one step's chunk), and the full-context table gets the rest; never more pages
    than max_num_seqs full-length sequences can use."""
    per_seq_state = state_bytes(specs, dtype)
    budget -= per_seq_state * max_num_seqs
    table_bytes = table_page_bytes(specs, page_size, dtype)
    most = max_num_seqs * -(-max_model_len // page_size) + 1
    window_pages = None
    if None in table_bytes and len(table_bytes) > 1:
        # n sequences of max_model_len tokens, plus one step's chunk in every window table (a prefill chunk
        # holds its window and all of its own tokens until the step ends)
        chunk = -(-max_num_batched_tokens // page_size)
        seq_bytes = sum(b * pages_for(w, max_model_len, page_size) for w, b in table_bytes.items())
        chunk_bytes = sum(b * chunk for w, b in table_bytes.items() if w is not None)
        n = max(1, min(max_num_seqs, (budget - chunk_bytes) // seq_bytes))
        window_pages = {w: min(most, n * pages_for(w, max_model_len, page_size) + chunk)
                        for w in table_bytes if w is not None}
        budget -= sum(n * table_bytes[w] for w, n in window_pages.items())
    per_page = table_bytes[None] if window_pages else sum(table_bytes.values())
    if budget <= 0:
        raise ValueError(f"the cache memory does not hold the recurrent states of {max_num_seqs} sequences and one "
                         f"sequence's sliding windows; lower max_num_seqs or raise kv_cache_memory")
    num_pages = min(budget // per_page, most) if per_page else most  # no per-token cache: pages only count
    if num_pages < 1:
        raise ValueError(f"kv_cache_memory of {budget} bytes holds no page ({per_page} bytes each)")
    return CachePlan(page_size, num_pages, window_pages, table_bytes, max_num_seqs if per_seq_state else 0,
                     per_seq_state)


def sequence_bytes(specs: list[CacheSpec | tuple[CacheSpec, ...]], page_size: int, dtype: torch.dtype,
                   max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> tuple[int, int]:
    """(fixed, per_sequence): `plan_cache` with a budget of fixed + n * per_sequence bytes holds n sequences
    of max_model_len tokens at once (1 <= n <= max_num_seqs). Fixed: the recurrent states of max_num_seqs
    sequences, one step's chunk in each sliding table and one spare page."""
    table_bytes = table_page_bytes(specs, page_size, dtype)
    states = state_bytes(specs, dtype) * max_num_seqs
    if None in table_bytes and len(table_bytes) > 1:  # plan_cache's SWA/global split
        chunk = -(-max_num_batched_tokens // page_size)
        per_seq = sum(b * pages_for(w, max_model_len, page_size) for w, b in table_bytes.items())
        return states + chunk * sum(b for w, b in table_bytes.items() if w is not None) + table_bytes[None], per_seq
    per_page = sum(table_bytes.values())  # every table gets the same number of pages
    longest = max((pages_for(w, max_model_len, page_size) for w in table_bytes), default=0)
    return states + max(per_page, 1), longest * per_page


def state_bytes(specs: list[CacheSpec | tuple[CacheSpec, ...]], dtype: torch.dtype) -> int:
    """Bytes one sequence's recurrent states cost across all layers."""
    return sum(s.bytes_per_sequence(torch.finfo(dtype).bits // 8) for _, s in flat_specs(specs)
               if isinstance(s, RecurrentState))


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
        recurrent = {i: s for i, s in flat_specs(specs) if isinstance(s, RecurrentState)}
        if recurrent and num_state_slots < 1:
            raise ValueError("this model has recurrent-state layers: give the cache num_state_slots >= 1")
        self.states = StatePool(recurrent, num_state_slots, dtype, self.device) if recurrent else None
        self.tables: list[PageTable] = []
        table_of_window: dict[int | None, int] = {}
        self.groups: list[CacheGroup] = []
        self.layer_group: dict[tuple[int, str], tuple[int, int]] = {}
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
            # uninitialised: the OS backs a page with memory only when it is first written, so a cache sized
            # for the worst case costs what is used; _zero_pages clears each page as it is handed out
            if isinstance(spec, (LatentKV, IndexerKeys)):  # one row per token shared by all heads, no values
                k = torch.empty(len(layers), 1, pages, page_size, spec.dim, dtype=dtype, device=device)
                v = torch.empty(0, dtype=dtype, device=device)
            else:
                shape = (len(layers), spec.num_kv_heads, pages, page_size)
                k = torch.empty(*shape, spec.head_dim, dtype=dtype, device=device)
                v = torch.empty(*shape, spec.v_head_dim or spec.head_dim, dtype=dtype, device=device)
            self.groups.append(CacheGroup(spec, layers, self.tables[ti].pool, ti, k, v))
            for j, layer in enumerate(layers):
                self.layer_group[(layer, spec_kind(spec))] = (gi, j)
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
        return True

    def _zero_pages(self, table: int, pages: list[int]) -> None:
        """Clear pages as they are handed out. Decode gathers whole pages and masks the slots past a
        sequence's end, but a masked slot still meets its value in `probs @ V` (0 * NaN = NaN), so no slot
        a sequence can read may hold uninitialised memory or another sequence's NaN."""
        if not pages:
            return
        idx = torch.tensor(pages, dtype=torch.long, device=self.device)
        for g in self.groups:
            if g.table == table:
                g.k.index_fill_(2, idx, 0)
                if g.v.numel():
                    g.v.index_fill_(2, idx, 0)

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

    # ---- the per-step handle the layers see ------------------------------------------------------
    def step_handle(self, reqs: list[Request], num_new: list[int]) -> "StepKV":
        B = len(reqs)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(num_new).cumsum(0)
        seq_lens = torch.tensor([r.num_computed + n for r, n in zip(reqs, num_new)])
        plans, slot_maps = [], []
        for gi, g in enumerate(self.tables):
            width = max(len(r.page_tables[gi]) for r in reqs)
            table = torch.full((B, width), 0, dtype=torch.long)
            for b, r in enumerate(reqs):
                t = torch.tensor(r.page_tables[gi], dtype=torch.long)
                table[b, : len(t)] = t.clamp(min=0)  # released pages are never gathered
            left = g.window - 1 if g.window is not None else -1
            plans.append(plan_paged(table, cu, seq_lens, self.page_size, left).to(self.device))
            pos = torch.cat([torch.arange(r.num_computed, r.num_computed + n) for r, n in zip(reqs, num_new)])
            rows = torch.repeat_interleave(torch.arange(B), torch.tensor(num_new))
            slots = table[rows, pos // self.page_size] * self.page_size + pos % self.page_size
            slot_maps.append(slots.to(self.device, non_blocking=True))
        state_slots = None
        if self.states is not None:
            state_slots = torch.tensor([r.state_slot for r in reqs], dtype=torch.long, device=self.device)
        return StepKV(self, plans, slot_maps, state_slots)


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


@dataclass
class StepKV:
    """Implements the layers' KVCache protocol for one step of the paged engine."""
    cache: PagedKVCache
    plans: list[PagedPlan]          # per page table
    slot_maps: list[torch.Tensor]   # per page table: the pool slot of each new token
    state_slots: torch.Tensor | None = None   # [B] each sequence's slot in the state pool

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, *,
               window_size: tuple[int, int], scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        kc, vc, plan = self.kv_step(layer_idx, k, v)
        return paged_attention_planned(q, kc, vc, plan, window_size=window_size, scale=scale, sinks=sinks)

    def kv_step(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, PagedPlan]:
        """Store this step's k/v [N, Hkv, d]; return the layer's head-major pools [Hkv, pages, page_size, d]
        and its table's plan, for layers that run their own attention over the pages (block-sparse MSA)."""
        gi, j = self.cache.layer_group[(layer_idx, "kv")]
        g = self.cache.groups[gi]
        kc, vc = g.k[j], g.v[j]
        slots = self.slot_maps[g.table]
        kc.view(kc.shape[0], -1, kc.shape[-1])[:, slots] = k.transpose(0, 1).to(kc.dtype)
        vc.view(vc.shape[0], -1, vc.shape[-1])[:, slots] = v.transpose(0, 1).to(vc.dtype)
        return kc, vc, self.plans[g.table]

    def rows_step(self, layer_idx: int, kind: str, rows: torch.Tensor) -> tuple[torch.Tensor, PagedPlan]:
        """One-row-per-token groups (kind "latent" or "indexer"): store this step's rows [N, D], return the
        layer's pool [pages, page_size, D] and the plan of its page table."""
        gi, j = self.cache.layer_group[(layer_idx, kind)]
        g = self.cache.groups[gi]
        kc = g.k[j][0]
        kc.view(-1, kc.shape[-1])[self.slot_maps[g.table]] = rows.to(kc.dtype)
        return kc, self.plans[g.table]

    def recurrent_states(self, layer_idx: int, spec: RecurrentState, like: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """RecurrentState layers: this step's sequences' conv inputs and state matrices, in batch order."""
        pool = self.cache.states
        return pool.conv[layer_idx][self.state_slots], pool.state[layer_idx][self.state_slots]

    def store_recurrent_states(self, layer_idx: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        pool = self.cache.states
        pool.conv[layer_idx][self.state_slots] = conv.to(pool.conv[layer_idx].dtype)
        pool.state[layer_idx][self.state_slots] = state.to(torch.float32)
