from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from attnzoo.engine.block_pool import BlockPool
from attnzoo.engine.radix_cache import Node, RadixCache


def make(num_pages: int = 16, page_size: int = 1) -> tuple[BlockPool, RadixCache]:
    pool = BlockPool(num_pages)
    return pool, RadixCache(pool, page_size)


def cache(pool: BlockPool, tree: RadixCache, tokens: list[int]) -> tuple[int, list[int]]:
    """What the engine does for a finished request: fresh pages, insert, release the request's references."""
    pages = pool.allocate(len(tokens) // tree.page_size)
    n = tree.insert(tokens, pages)
    pool.decref(pages)
    return n, pages


def assert_idle(pool: BlockPool, tree: RadixCache) -> None:
    """The engine's leak check, valid when no request holds pages."""
    tree.check_integrity()
    pool.check()
    assert pool.num_free + tree.cached_pages == pool.capacity
    assert tree.pages_of() == {p for p in range(pool.capacity) if pool.ref(p)}


def path_of(node: Node) -> tuple[tuple[int, ...], list[int]]:
    """Tokens and pages from the root down to node, read via parent links (does not touch access times)."""
    keys, values = [], []
    while node.parent is not None:
        keys.append(node.key)
        values.append(node.value)
        node = node.parent
    return tuple(t for k in reversed(keys) for t in k), [p for v in reversed(values) for p in v]


def test_exact_match_and_miss():
    pool, tree = make()
    assert cache(pool, tree, [1, 2, 3]) == (0, [0, 1, 2])
    pages, h = tree.match_prefix([1, 2, 3])
    assert pages == [0, 1, 2] and h.key == (1, 2, 3)
    assert tree.match_prefix([1, 2, 3, 4])[0] == [0, 1, 2]
    pages, h = tree.match_prefix([9, 1])
    assert pages == [] and h is tree.root
    assert tree.match_prefix([])[0] == []
    assert_idle(pool, tree)


def test_partial_match_splits_node():
    pool, tree = make()
    _, pages = cache(pool, tree, [1, 2, 3, 4])
    got, h = tree.match_prefix([1, 2, 5])
    assert got == pages[:2] and h.key == (1, 2) and h.value == pages[:2]
    assert list(h.children) == [(3,)] and h.children[(3,)].value == pages[2:]
    assert h.parent is tree.root
    assert tree.match_prefix([1, 2, 3, 4])[0] == pages  # both halves still reachable
    assert tree.cached_pages == 4
    assert_idle(pool, tree)


def test_match_rounds_down_to_pages():
    pool, tree = make(page_size=2)
    _, pages = cache(pool, tree, [1, 2, 3, 4, 5, 6])
    assert tree.match_prefix([1, 2, 3, 4, 5])[0] == pages[:2]  # 5 tokens -> 2 whole pages
    got, h = tree.match_prefix([1, 2, 3, 9])  # diverges inside page 2
    assert got == pages[:1] and h.key == (1, 2)
    assert tree.match_prefix([1])[0] == []
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 7])[0] == pages
    assert_idle(pool, tree)


def test_insert_returns_cached_length():
    pool, tree = make(page_size=2)
    assert cache(pool, tree, [1, 2, 3, 4])[0] == 0
    assert cache(pool, tree, [1, 2, 3, 4, 5, 6])[0] == 4
    assert cache(pool, tree, [1, 2, 7, 7])[0] == 2
    assert cache(pool, tree, [1, 2])[0] == 2
    assert cache(pool, tree, [])[0] == 0
    assert tree.cached_pages == 4  # [1,2] [3,4] [5,6] [7,7]
    assert_idle(pool, tree)


def test_insert_validates():
    pool, tree = make(page_size=2)
    with pytest.raises(ValueError):
        tree.insert([1, 2, 3], pool.allocate(1))
    with pytest.raises(ValueError):
        tree.insert([1, 2, 3, 4], pool.allocate(1))
    _, pages = cache(pool, tree, [1, 2])
    pool.incref(pages)
    with pytest.raises(ValueError, match="aliasing"):  # the tree's own page under a second key
        tree.insert([5, 5], pages)
    pool.decref(pages)
    with pytest.raises(ValueError):
        tree.insert([6, 6], [15])  # a free page
    tree.check_integrity()


def test_duplicate_insert_frees_nothing_itself():
    pool, tree = make()
    first = pool.allocate(3)
    assert tree.insert([1, 2, 3], first) == 0
    second = pool.allocate(3)
    free_before = pool.num_free
    assert tree.insert([1, 2, 3], second) == 3
    assert pool.num_free == free_before and [pool.ref(p) for p in second] == [1, 1, 1]
    assert [pool.ref(p) for p in first] == [2, 2, 2]  # request + tree
    assert pool.decref(second) == 3  # the duplicates are the caller's to free
    assert pool.decref(first) == 0  # the tree keeps the originals alive
    assert tree.evictable_pages == 3
    assert_idle(pool, tree)


def test_engine_flow_with_prefix_hit():
    """Request 2 reuses request 1's cached prefix: match, lock, share the pages, compute the rest, insert, release."""
    pool, tree = make(num_pages=8)
    cache(pool, tree, [1, 2, 3])
    hit, h = tree.match_prefix([1, 2, 3, 4, 5])
    tree.lock(h)
    pool.incref(hit)
    pages = hit + pool.allocate(2)
    assert tree.protected_pages == 3 and tree.evictable_pages == 0
    assert pool.num_free + tree.cached_pages < pool.capacity  # the request holds two pages
    assert tree.insert([1, 2, 3, 4, 5], pages) == 3
    pool.decref(pages)
    tree.unlock(h)
    assert tree.evictable_pages == 5
    assert_idle(pool, tree)


def test_lock_protects_from_evict():
    pool, tree = make()
    cache(pool, tree, [1, 2])
    cache(pool, tree, [3, 4, 5])
    _, h = tree.match_prefix([1, 2])
    tree.lock(h)
    assert (tree.protected_pages, tree.evictable_pages) == (2, 3)
    assert tree.evict(10) == 3  # only the unlocked branch goes
    assert tree.match_prefix([1, 2])[0] == [0, 1] and tree.match_prefix([3])[0] == []
    assert tree.evict(1) == 0
    tree.unlock(h)
    with pytest.raises(ValueError):
        tree.unlock(h)
    assert tree.evict(1) == 2
    assert_idle(pool, tree)
    with pytest.raises(ValueError):
        tree.lock(h)  # evicted handle


def test_lock_nests_along_the_path():
    pool, tree = make()
    cache(pool, tree, [1, 2, 3, 4])
    _, short = tree.match_prefix([1, 2])
    _, long = tree.match_prefix([1, 2, 3, 4])
    tree.lock(long)
    tree.lock(short)
    assert (short.lock_ref, long.lock_ref) == (2, 1) and tree.protected_pages == 4
    tree.unlock(long)
    assert (tree.protected_pages, tree.evictable_pages) == (2, 2)
    assert tree.evict(10) == 2  # the unlocked child goes, the locked parent stays
    tree.unlock(short)
    assert_idle(pool, tree)


def test_split_of_locked_node_keeps_both_halves_locked():
    pool, tree = make()
    cache(pool, tree, [1, 2, 3, 4])
    _, h = tree.match_prefix([1, 2, 3, 4])
    tree.lock(h)
    _, top = tree.match_prefix([1, 2])
    assert top.lock_ref == h.lock_ref == 1 and tree.protected_pages == 4
    tree.check_integrity()
    tree.unlock(h)
    assert top.lock_ref == 0 and tree.evictable_pages == 4
    assert_idle(pool, tree)


def test_lru_order():
    pool, tree = make()
    cache(pool, tree, [1])
    cache(pool, tree, [2])
    cache(pool, tree, [3])
    tree.match_prefix([1])  # [1] is now the most recent
    assert tree.evict(1) == 1 and tree.match_prefix([2])[0] == []
    assert tree.evict(1) == 1 and tree.match_prefix([3])[0] == []
    assert tree.match_prefix([1])[0] != []
    assert_idle(pool, tree)


def test_parent_becomes_evictable_after_child():
    pool, tree = make()
    cache(pool, tree, [1, 2, 3, 4])
    tree.match_prefix([1, 2, 9])  # split: (1,2) -> (3,4)
    assert tree.evict(1) == 2  # the leaf (3,4) goes whole
    assert tree.match_prefix([1, 2, 3])[0] == [0, 1]
    assert tree.evict(1) == 2  # then its parent, now a leaf
    assert tree.cached_pages == 0 and pool.num_free == 16
    cache(pool, tree, [1, 2, 3, 4])
    tree.match_prefix([1, 2])
    assert tree.evict(3) == 4  # one call: child, then the parent it exposes
    assert_idle(pool, tree)


def test_evict_counts_only_pages_returned_to_pool():
    pool, tree = make()
    pages = pool.allocate(2)
    tree.insert([1, 2], pages)  # the request still holds its references
    assert tree.evict(2) == 0 and tree.cached_pages == 0
    assert pool.decref(pages) == 2
    assert_idle(pool, tree)


def test_reset():
    pool, tree = make(page_size=2)
    cache(pool, tree, [1, 2, 3, 4])
    cache(pool, tree, [1, 2, 5, 6])
    _, h = tree.match_prefix([1, 2, 3, 4])
    old_root = tree.root
    tree.lock(h)
    with pytest.raises(RuntimeError):
        tree.reset()
    tree.unlock(h)
    tree.reset()
    assert tree.cached_pages == 0 and pool.num_free == 16 and tree.pages_of() == set()
    for stale in (h, old_root):
        with pytest.raises(ValueError):
            tree.lock(stale)
    assert tree.match_prefix([1, 2])[0] == []
    assert_idle(pool, tree)


# ---- property test against a dict model --------------------------------------------------------------------------

CAPACITY = 24  # room for one 16-token sequence plus some cache, so eviction is frequent but not constant


def tree_prefixes(tree: RadixCache) -> dict[tuple[int, ...], int]:
    """Every page-aligned prefix stored in the tree -> the page holding its last page of tokens."""
    ps, out, stack = tree.page_size, {}, [((), tree.root)]
    while stack:
        prefix, node = stack.pop()
        for j, page in enumerate(node.value):
            out[prefix + node.key[:(j + 1) * ps]] = page
        stack.extend((prefix + node.key, c) for c in node.children.values())
    return out


class RadixMachine(RuleBasedStateMachine):
    page_size = 1

    def __init__(self) -> None:
        super().__init__()
        self.ps = self.page_size
        self.pool, self.tree = make(CAPACITY, self.ps)
        self.model: dict[tuple[int, ...], int] = {}  # cached page-aligned prefix -> its last page
        self.history: list[tuple[int, ...]] = []
        self.handles: list[tuple[Node, tuple[int, ...], list[int]]] = []  # node, its path's tokens and pages
        self.locked: list[tuple[Node, tuple[int, ...], list[int]]] = []

    def draw_tokens(self, data: st.DataObject) -> tuple[int, ...]:
        # Extending a cached prefix or an earlier sequence makes hits, shared prefixes and splits common.
        base: tuple[int, ...] = ()
        source = data.draw(st.sampled_from(["cached", "history", "fresh"]))
        if source == "cached" and self.model:
            base = data.draw(st.sampled_from(list(self.model)))
        elif source == "history" and self.history:
            base = data.draw(st.sampled_from(self.history))
            base = base[:len(base) - data.draw(st.integers(0, len(base)))]  # shrinks toward the whole base
        return base + tuple(data.draw(st.lists(st.integers(0, 3), max_size=16 - len(base))))

    def expected_match(self, tokens: tuple[int, ...]) -> list[int]:
        pages, k = [], self.ps
        while k <= len(tokens) and tokens[:k] in self.model:
            pages.append(self.model[tokens[:k]])
            k += self.ps
        return pages

    def sync_after_evict(self, asked: int, freed: int) -> None:
        now = tree_prefixes(self.tree)
        assert now.items() <= self.model.items(), "eviction changed a cached prefix"
        assert freed == len(self.model) - len(now)  # no request holds pages between steps
        assert freed >= asked or self.tree.evictable_pages == 0
        self.model = now

    @rule(data=st.data(), reuse=st.booleans())
    def insert(self, data: st.DataObject, reuse: bool) -> None:
        tokens = self.draw_tokens(data)
        tokens = tokens[:len(tokens) // self.ps * self.ps]
        hit, h = self.tree.match_prefix(tokens) if reuse else ([], self.tree.root)
        assert hit == (self.expected_match(tokens) if reuse else [])
        self.tree.lock(h)  # a reused prefix must survive the eviction below
        need = len(tokens) // self.ps - len(hit)
        if self.pool.num_free < need:
            self.sync_after_evict(need - self.pool.num_free, self.tree.evict(need - self.pool.num_free))
        if self.pool.num_free < need:
            self.tree.unlock(h)
            return
        self.pool.incref(hit)
        pages = hit + self.pool.allocate(need)
        n = self.tree.insert(tokens, pages)
        assert n == len(self.expected_match(tokens)) * self.ps and n >= len(hit) * self.ps
        for k in range(n // self.ps + 1, len(tokens) // self.ps + 1):
            self.model[tokens[:k * self.ps]] = pages[k - 1]
        self.pool.decref(pages)
        self.tree.unlock(h)
        self.history.append(tokens)

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        tokens = self.draw_tokens(data)
        pages, h = self.tree.match_prefix(tokens)
        assert pages == self.expected_match(tokens)
        path_tokens, path_pages = path_of(h)
        assert path_tokens == tokens[:len(pages) * self.ps] and path_pages == pages
        self.history.append(tokens)
        if h is not self.tree.root:  # locking the root is a no-op
            self.handles.append((h, path_tokens, pages))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(self.handles))
        if entry[0].evicted:
            with pytest.raises(ValueError):
                self.tree.lock(entry[0])
            self.handles.remove(entry)
        else:
            self.tree.lock(entry[0])
            self.locked.append(entry)

    @precondition(lambda self: self.locked)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        entry = self.locked.pop(data.draw(st.integers(0, len(self.locked) - 1)))
        self.tree.unlock(entry[0])

    @rule(n=st.integers(0, 6))
    def evict(self, n: int) -> None:
        self.sync_after_evict(n, self.tree.evict(n))

    @precondition(lambda self: not self.locked)
    @rule(roll=st.integers(0, 9))
    def reset(self, roll: int) -> None:
        if roll:  # rare: a reset wipes the state the other rules build up
            return
        self.tree.reset()
        self.model.clear()

    @invariant()
    def consistent(self) -> None:
        assert_idle(self.pool, self.tree)
        assert tree_prefixes(self.tree) == self.model
        assert len(set(self.model.values())) == len(self.model) == self.tree.cached_pages  # no page owned twice
        for node, tokens, pages in self.locked:  # locked paths never move or lose pages
            assert not node.evicted and path_of(node) == (tokens, pages)
        for node, tokens, pages in self.handles:  # splits never change what a live handle covers
            assert node.evicted or path_of(node) == (tokens, pages)
        assert self.tree.protected_pages == len({p for _, _, ps in self.locked for p in ps})


def _machine_test(page_size: int) -> type:
    machine = type(f"RadixMachinePage{page_size}", (RadixMachine,), {"page_size": page_size})
    machine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
    return machine.TestCase


TestRadixPage1, TestRadixPage2, TestRadixPage4 = (_machine_test(ps) for ps in (1, 2, 4))


# ---------------------------------------------------------------- hybrids: side tables and snapshots

N = -1  # NULL_PAGE


def make_hybrid(window: int, page_size: int = 2) -> tuple[BlockPool, BlockPool, RadixCache, list[int]]:
    pool, side = BlockPool(32), BlockPool(32)
    released: list[int] = []
    return pool, side, RadixCache(pool, page_size, [side], [window], released.append), released


def cache_hybrid(pool: BlockPool, side: BlockPool, tree: RadixCache, tokens: list[int], live_from: int) -> list[int]:
    """A finished request whose sliding table still holds pages live_from.. (earlier ones left its window)."""
    n = len(tokens) // tree.page_size
    pages, sp = pool.allocate(n), side.allocate(n)
    side.decref(sp[:live_from])
    tree.insert(tokens, pages, [[N] * live_from + sp[live_from:]])
    pool.decref(pages)
    side.decref(sp[live_from:])
    return sp


def assert_idle_hybrid(pool: BlockPool, side: BlockPool, tree: RadixCache) -> None:
    assert_idle(pool, tree)
    side.check()
    assert tree.side_pages_of(0) == {p for p in range(side.capacity) if side.ref(p)}


def test_sliding_hit_needs_the_window_before_it():
    pool, side, tree, _ = make_hybrid(window=5, page_size=2)   # the next token sees the 4 tokens before it
    tokens = list(range(16))                                     # 8 pages; pages 0-4 left the window
    sp = cache_hybrid(pool, side, tree, tokens, live_from=5)
    hit = tree.match(tokens + [99])
    assert hit.tokens == 16 and hit.side == [[N] * 6 + sp[6:8]]  # tokens 12..15 live on pages 6, 7
    # a hit at 12 tokens needs tokens 8..11 (pages 4, 5), at 10 tokens pages 3, 4, ...: all reach a tombstone
    short = tree.match(tokens[:12] + [77])
    assert short.tokens == 0 and short.node is tree.root
    assert_idle_hybrid(pool, side, tree)


def test_tombstones_refill_and_evict_side():
    pool, side, tree, _ = make_hybrid(window=3, page_size=2)
    tokens = list(range(12))
    cache_hybrid(pool, side, tree, tokens, live_from=5)          # pages 0-4 tombstoned
    assert tree.match(tokens[:6] + [50]).tokens == 0             # 6 tokens need page 2
    sp = cache_hybrid(pool, side, tree, tokens[:6], live_from=0)  # a shorter request refills pages 0-2
    hit = tree.match(tokens[:6] + [50])
    assert hit.tokens == 6 and hit.side == [[N, N, sp[2]]]       # window 3: tokens 4, 5 -> page 2
    assert_idle_hybrid(pool, side, tree)
    freed = tree.evict_side(0, 100)
    assert freed == 4 and side.num_free == side.capacity and not tree.side_pages_of(0)
    assert tree.match(tokens).tokens == 0                        # full pages are still there, windows are not
    assert tree.match_prefix(tokens)[0] != []
    assert_idle_hybrid(pool, side, tree)


def test_snapshots_mark_where_a_hit_may_end():
    pool = BlockPool(32)
    released: list[int] = []
    tree = RadixCache(pool, 2, release_snapshot=released.append)
    cache(pool, tree, list(range(12)))
    assert tree.match(list(range(12)), need_snapshot=True).tokens == 0
    assert tree.set_snapshot(list(range(8)), 7)                  # splits the node at 8 tokens
    assert not tree.set_snapshot(list(range(8)), 8)              # that point already has one
    assert not tree.set_snapshot(list(range(14)), 9)             # not cached
    hit = tree.match(list(range(12)) + [5], need_snapshot=True)
    assert (hit.tokens, hit.snapshot, len(hit.pages)) == (8, 7, 4)
    assert tree.match(list(range(12))).tokens == 12              # without the need: the whole prefix
    tree.match_prefix(list(range(4)) + [40])                     # a split above keeps the snapshot below
    assert tree.match(list(range(12)), need_snapshot=True).snapshot == 7
    tree.check_integrity()
    assert tree.evict_snapshots(5) == 1 and released == [7] and tree.snapshots == 0
    assert tree.set_snapshot(list(range(12)), 3)
    tree.evict(100)                                              # evicting the node releases its snapshot
    assert released == [7, 3] and tree.snapshots == 0
    assert_idle(pool, tree)


def test_reset_releases_side_pages_and_snapshots():
    pool, side, tree, released = make_hybrid(window=4)
    cache_hybrid(pool, side, tree, list(range(8)), live_from=1)
    assert tree.set_snapshot(list(range(8)), 0)
    tree.reset()
    assert released == [0] and side.num_free == side.capacity and pool.num_free == pool.capacity
