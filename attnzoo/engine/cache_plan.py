"""Memory planning for the paged cache: which layers share a cache group and a page table, what a page
costs, and how a memory budget splits into page tables and recurrent-state slots. Pure arithmetic over
the layers' cache specs; nothing here allocates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnzoo.layers.cache_spec import CacheKind, CacheSpec, RecurrentState

PAGED_KINDS = (CacheKind.KV, CacheKind.LATENT, CacheKind.INDEX_KEYS, CacheKind.ROWS, CacheKind.COMPRESSED)


def check_servable(specs: list[CacheSpec | tuple[CacheSpec, ...]]) -> None:
    """Refuse a model with a layer no cache can hold, naming its mechanism."""
    for i, s in flat_specs(specs):
        if s.kind is CacheKind.UNSERVED:
            raise NotImplementedError(f"layer {i} cannot be served: {s.message}")


def flat_specs(specs: list[CacheSpec | tuple[CacheSpec, ...]]) -> list[tuple[int, CacheSpec]]:
    """(layer, spec) pairs: a layer may declare several specs (DSA: a latent and indexer keys)."""
    return [(i, s) for i, entry in enumerate(specs) for s in (entry if isinstance(entry, tuple) else (entry,))]


def group_specs(specs: list[CacheSpec | tuple[CacheSpec, ...]]) -> list[tuple[CacheSpec, list[int]]]:
    """Paged groups: layers with equal per-token specs share page tensors (recurrent layers have none);
    full-context groups first (their table is the radix tree's), then the sliding ones, each in layer order."""
    groups: dict[CacheSpec, list[int]] = {}
    for i, s in flat_specs(specs):
        if s.kind is CacheKind.STATE:
            continue
        if s.kind not in PAGED_KINDS:
            raise NotImplementedError(f"layer {i}: the engine has no cache group for {type(s).__name__} yet")
        groups.setdefault(s, []).append(i)
    return sorted(groups.items(), key=lambda g: g[0].window is not None)


def recurrent_specs(specs: list[CacheSpec | tuple[CacheSpec, ...]]) -> dict[int, RecurrentState]:
    """The layers that keep a fixed-size state per sequence (delta rule), by layer."""
    return {i: s for i, s in flat_specs(specs) if s.kind is CacheKind.STATE}


def page_bytes(specs: list[CacheSpec | tuple[CacheSpec, ...]], page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page costs across all layers (each table gets the same number of pages)."""
    return sum(s.bytes_per_page(page_size, torch.finfo(dtype).bits // 8) for _, s in flat_specs(specs))


def table_page_bytes(specs: list[CacheSpec | tuple[CacheSpec, ...]], page_size: int, dtype: torch.dtype
                     ) -> dict[int | None, int]:
    """Bytes one page costs per page table: full-context specs share table None, each window its own."""
    out: dict[int | None, int] = {}
    for _, s in flat_specs(specs):
        if s.kind is CacheKind.STATE:
            continue
        w = s.window
        out[w] = out.get(w, 0) + s.bytes_per_page(page_size, torch.finfo(dtype).bits // 8)
    return out


def pages_for(window: int | None, num_tokens: int, page_size: int) -> int:
    """Pages one sequence of num_tokens tokens holds at most in a table (full context, or a window: the
    window before its last page boundary, which the prefix cache may keep, plus the page being filled)."""
    full = -(-num_tokens // page_size)
    return full if window is None else min(full, -(-window // page_size) + 2)


@dataclass
class CachePlan:
    """How a memory budget splits into page tables (and recurrent-state slots)."""
    page_size: int
    num_pages: int                        # the full-context table (every table when window_pages is None)
    window_pages: dict[int, int] | None   # pages of each sliding window's table
    table_bytes: dict[int | None, int]    # bytes of one page of each table
    state_slots: int
    state_bytes: int                      # per slot
    snapshot_slots: int = 0               # recurrent-state snapshots the prefix cache may keep

    def tables(self) -> dict[int | None, int]:
        return {w: self.num_pages if self.window_pages is None or w is None else self.window_pages[w]
                for w in self.table_bytes}

    @property
    def total_bytes(self) -> int:
        return sum(n * self.table_bytes[w] for w, n in self.tables().items()) + \
            (self.state_slots + self.snapshot_slots) * self.state_bytes

    def max_concurrency(self, num_tokens: int) -> int:
        """Sequences of num_tokens tokens that fit at once."""
        fits = [n // max(1, pages_for(w, num_tokens, self.page_size)) for w, n in self.tables().items()]
        return min(fits + ([self.state_slots] if self.state_bytes else []), default=0)


def plan_cache(specs: list[CacheSpec | tuple[CacheSpec, ...]], page_size: int, dtype: torch.dtype, budget: int,
               max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, snapshots: int = 0) -> CachePlan:
    """Split `budget` bytes: recurrent states of max_num_seqs sequences (and `snapshots` copies of one
    sequence's states, which the prefix cache keeps at cached prefixes) first; then, for SWA/global hybrids,
    each sliding table gets the pages that as many max_model_len-token sequences as the memory holds can
    use (a window each, plus one step's chunk), and the full-context table gets the rest; never more pages
    than max_num_seqs full-length sequences can use."""
    per_seq_state = state_bytes(specs, dtype)
    snapshots = snapshots if per_seq_state else 0
    budget -= per_seq_state * (max_num_seqs + snapshots)
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
                     per_seq_state, snapshots)


def sequence_bytes(specs: list[CacheSpec | tuple[CacheSpec, ...]], page_size: int, dtype: torch.dtype,
                   max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                   snapshots: int = 0) -> tuple[int, int]:
    """(fixed, per_sequence): `plan_cache` with a budget of fixed + n * per_sequence bytes holds n sequences
    of max_model_len tokens at once (1 <= n <= max_num_seqs). Fixed: the recurrent states of max_num_seqs
    sequences and their `snapshots`, one step's chunk in each sliding table and one spare page."""
    table_bytes = table_page_bytes(specs, page_size, dtype)
    states = state_bytes(specs, dtype) * (max_num_seqs + snapshots)
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
               if s.kind is CacheKind.STATE)
