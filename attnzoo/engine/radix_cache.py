"""Prefix cache as a radix tree over token ids, at page granularity (RadixAttention).

Every edge holds whole pages: `key` is the edge's token ids (a multiple of page_size) and `value` the pages
holding their KV. The tree owns ONE pool reference per page it holds; requests hold their own. Nodes with
lock_ref > 0 are in use by some request (protected); unlocked leaves are evicted in LRU order.
Leak check: pool.num_free + cached_pages == capacity whenever no request holds pages.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from attnzoo.engine.block_pool import BlockPool


@dataclass(eq=False)  # identity semantics: nodes go in sets and are compared with `is`
class Node:
    key: tuple[int, ...]
    value: list[int]
    parent: Node | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0
    serial: int = 0  # creation order; breaks LRU ties deterministically

    @property
    def evicted(self) -> bool:
        return self.parent is None and self.lock_ref == 0  # the root is permanently locked

    def __repr__(self) -> str:
        return f"Node(key={self.key}, value={self.value}, lock_ref={self.lock_ref}, last_access={self.last_access})"


class RadixCache:
    def __init__(self, pool: BlockPool, page_size: int):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.pool, self.page_size = pool, page_size
        self._clock = 0  # logical time, not wall time, so LRU order is deterministic
        self._serials = itertools.count()
        self._new_root()

    def _new_root(self) -> None:
        self.root = Node(key=(), value=[], lock_ref=1, serial=next(self._serials))
        self._evictable = self._protected = 0
        self._owned: set[int] = set()

    # ---- lookup / insert -------------------------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], Node]:
        """Longest cached prefix of `tokens`, rounded down to whole pages: (its pages, handle node).
        Splits the last node if the match ends inside it, so the handle's path is exactly the match."""
        node, _, pages = self._walk(self._aligned(tokens))
        return pages, node

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Cache `tokens` whose KV lives in `pages`. The uncached suffix becomes a new leaf that increfs its pages.
        Returns how many tokens were already cached; the caller's pages for that range are its own to release."""
        ps = self.page_size
        if len(tokens) % ps:
            raise ValueError(f"{len(tokens)} tokens is not a multiple of page_size {ps}")
        if len(pages) != len(tokens) // ps:
            raise ValueError(f"{len(tokens)} tokens need {len(tokens) // ps} pages, got {len(pages)}")
        tokens = tuple(map(int, tokens))
        node, matched, _ = self._walk(tokens)
        if matched < len(tokens):
            new = list(map(int, pages[matched // ps:]))
            if len(set(new)) != len(new) or self._owned.intersection(new):
                raise ValueError(f"pages {new} repeat or are already owned by the tree (aliasing)")
            self.pool.incref(new)  # raises before any tree change if a page is not allocated
            leaf = Node(key=tokens[matched:], value=new, parent=node, last_access=self._clock,
                        serial=next(self._serials))
            node.children[leaf.key[:ps]] = leaf
            self._owned.update(new)
            self._evictable += len(new)
        return matched

    def _aligned(self, tokens: Sequence[int]) -> tuple[int, ...]:
        n = len(tokens) // self.page_size * self.page_size
        return tuple(map(int, tokens[:n]))  # int() so tensors/np ints hash like Python ints

    def _walk(self, tokens: tuple[int, ...]) -> tuple[Node, int, list[int]]:
        """Follow `tokens` (page aligned) down the tree, refreshing access times and splitting where the match
        ends mid-node. Returns (deepest matched node, matched token count, matched pages)."""
        ps = self.page_size
        self._clock += 1
        node, i, pages = self.root, 0, []
        node.last_access = self._clock
        while i < len(tokens):
            child = node.children.get(tokens[i:i + ps])
            if child is None:
                break
            m = ps  # the first page matched via the dict key; compare the rest page by page
            while m < len(child.key) and i + m < len(tokens) and child.key[m:m + ps] == tokens[i + m:i + m + ps]:
                m += ps
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = self._clock
            pages.extend(child.value)
            node, i = child, i + m
        return node, i, pages

    def _split(self, child: Node, m: int) -> Node:
        """Cut `child` after m tokens; the new upper node takes the prefix and inherits the lock count,
        so evictable/protected totals don't change."""
        ps, parent = self.page_size, child.parent
        assert parent is not None and 0 < m < len(child.key) and m % ps == 0
        top = Node(key=child.key[:m], value=child.value[:m // ps], parent=parent, lock_ref=child.lock_ref,
                   last_access=child.last_access, serial=next(self._serials))
        child.key, child.value, child.parent = child.key[m:], child.value[m // ps:], top
        top.children[child.key[:ps]] = child
        parent.children[top.key[:ps]] = top
        return top

    # ---- locking ---------------------------------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        """Protect node and its ancestors from eviction (a request is using their pages)."""
        if node.evicted:
            raise ValueError("cannot lock an evicted node")
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.value)
                self._protected += len(node.value)
            node.lock_ref += 1
            node = node.parent
            assert node is not None

    def unlock(self, node: Node) -> None:
        if node is not self.root and node.lock_ref <= 0:  # ancestors' lock_ref >= node's, so checking node suffices
            raise ValueError("unlock of a node that is not locked")
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.value)
                self._evictable += len(node.value)
            node = node.parent
            assert node is not None

    # ---- eviction --------------------------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Remove least recently used unlocked leaves until the pool got back >= num_pages pages (or nothing is
        left to evict). Returns the pages actually freed; a page still referenced by a request does not count."""
        if num_pages < 0:
            raise ValueError(f"cannot evict {num_pages} pages")
        heap = [(n.last_access, n.serial, n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[:self.page_size]]
            node.parent = None
            self._evictable -= len(node.value)
            self._owned.difference_update(node.value)
            freed += self.pool.decref(node.value)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.serial, parent))
        return freed

    def reset(self) -> None:
        """Drop the whole tree and its page references; only legal when no request holds a lock."""
        if self._protected or any(n.lock_ref for n in self._nodes()):
            raise RuntimeError(f"reset with {self._protected} protected pages: unlock every handle first")
        nodes = list(self._nodes())
        self.pool.decref(p for n in nodes for p in n.value)
        for n in nodes:
            n.parent = None  # stale handles now report evicted
            n.children = {}
        self.root.children, self.root.lock_ref = {}, 0  # the old root is a stale handle too
        self._new_root()

    # ---- accounting ------------------------------------------------------------------------------------------

    @property
    def evictable_pages(self) -> int:
        return self._evictable

    @property
    def protected_pages(self) -> int:
        return self._protected

    @property
    def cached_pages(self) -> int:
        return self._evictable + self._protected

    def pages_of(self) -> set[int]:
        """Every page the tree owns (one pool reference each)."""
        return set(self._owned)

    def _nodes(self) -> Iterator[Node]:
        """All non-root nodes, depth first."""
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def check_integrity(self) -> None:
        ps, seen, evictable, protected = self.page_size, set[int](), 0, 0
        assert self.root.parent is None and self.root.lock_ref == 1 and not self.root.key
        for n in self._nodes():
            assert n.parent is not None and n.parent.children.get(n.key[:ps]) is n, f"{n} is not under its key"
            assert len(n.key) > 0 and len(n.key) == len(n.value) * ps, f"{n}: key/value length mismatch"
            assert n.lock_ref >= 0, f"{n}: negative lock_ref"
            if n.parent is not self.root:
                assert n.parent.lock_ref >= n.lock_ref, f"{n} is locked more than its parent"
            for p in n.value:
                assert p not in seen, f"page {p} appears twice in the tree"
                assert self.pool.ref(p) >= 1, f"tree page {p} is free in the pool"
                seen.add(p)
            if n.lock_ref:
                protected += len(n.value)
            else:
                evictable += len(n.value)
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"counters evictable={self._evictable} protected={self._protected}, recount {evictable}/{protected}")
        assert seen == self._owned, "owned-page set drifted from the tree"
