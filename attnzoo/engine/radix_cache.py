"""Prefix cache as a radix tree over token ids, at page granularity (RadixAttention).

Every edge holds whole pages: `key` is the edge's token ids (a multiple of page_size) and `value` the pages
holding their KV. The tree owns ONE pool reference per page it holds; requests hold their own. Nodes with
lock_ref > 0 are in use by some request (protected); unlocked leaves are evicted in LRU order.
Leak check: pool.num_free + cached_pages == capacity whenever no request holds pages.

Hybrid models cache more than the full-context pages (docs/engine.md, "Prefix caching for hybrids"):
* side tables (one per sliding window): `node.side[i]` runs beside `node.value`, one page per page of
  tokens, NULL_PAGE where the page was dropped (a tombstone: the tree still matches through it). Side pages
  are never needed by a running request through the tree (a request holds its own references), so they
  can be tombstoned under memory pressure whatever the locks (`evict_side`).
* snapshots (recurrent layers): `node.snapshot` names a slot of the engine's snapshot pool holding every
  recurrent layer's state after the node's last token. Dropped with their node or under pressure
  (`evict_snapshots`); the engine's callback frees the slot.
`match` trims a hit back to the longest prefix every side table (its window's pages present) and, when
asked, a snapshot can serve.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from attnzoo.engine.block_pool import BlockPool

NULL_PAGE = -1  # a page released because it left the sliding window (vLLM's null block), or a tombstone


@dataclass(eq=False)  # identity semantics: nodes go in sets and are compared with `is`
class Node:
    key: tuple[int, ...]
    value: list[int]
    parent: Node | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0
    serial: int = 0  # creation order; breaks LRU ties deterministically
    side: list[list[int]] = field(default_factory=list)  # per side table, aligned with value; NULL_PAGE = none
    snapshot: int | None = None  # recurrent states after this node's last token (a snapshot-pool slot)

    @property
    def evicted(self) -> bool:
        return self.parent is None and self.lock_ref == 0  # the root is permanently locked

    def __repr__(self) -> str:
        return f"Node(key={self.key}, value={self.value}, lock_ref={self.lock_ref}, last_access={self.last_access})"


@dataclass
class Hit:
    """A usable cached prefix: `tokens` tokens, their full-context `pages`, per side table the pages a
    request adopts (NULL_PAGE before its window), the `node` to lock, and its snapshot slot (or None)."""
    tokens: int
    pages: list[int]
    side: list[list[int]]
    node: Node
    snapshot: int | None
    reachable: int = 0  # tokens the full-context pages cover along this prefix (>= tokens): a branch point


class RadixCache:
    def __init__(self, pool: BlockPool, page_size: int, side_pools: Sequence[BlockPool] = (),
                 windows: Sequence[int] = (), release_snapshot: Callable[[int], None] | None = None):
        """side_pools[i] holds the pages of a sliding window of windows[i] tokens; release_snapshot(slot) is
        called when the tree lets go of a snapshot."""
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if len(side_pools) != len(windows):
            raise ValueError(f"{len(side_pools)} side pools but {len(windows)} windows")
        self.pool, self.page_size = pool, page_size
        self.side_pools, self.windows = list(side_pools), list(windows)
        self.release_snapshot = release_snapshot or (lambda slot: None)
        self._clock = 0  # logical time, not wall time, so LRU order is deterministic
        self._serials = itertools.count()
        self._new_root()

    def _new_root(self) -> None:
        self.root = Node(key=(), value=[], lock_ref=1, serial=next(self._serials),
                         side=[[] for _ in self.side_pools])
        self._evictable = self._protected = 0
        self._owned: set[int] = set()
        self._side_owned: list[set[int]] = [set() for _ in self.side_pools]
        self._snapshots: set[int] = set()

    # ---- lookup / insert -------------------------------------------------------------------------------------

    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], Node]:
        """Longest cached prefix of `tokens`, rounded down to whole pages: (its pages, handle node).
        Splits the last node if the match ends inside it, so the handle's path is exactly the match."""
        node, _, pages = self._walk(self._aligned(tokens))
        return pages, node

    def insert(self, tokens: Sequence[int], pages: Sequence[int], side: Sequence[Sequence[int]] = ()) -> int:
        """Cache `tokens` whose KV lives in `pages` (and, per side table, `side[i]`, NULL_PAGE where the request
        no longer holds the page). The uncached suffix becomes a new leaf that increfs its pages; tombstones on
        the cached part are refilled from the request's live side pages. Returns how many tokens were already
        cached; the caller's full-context pages for that range are its own to release."""
        ps = self.page_size
        if len(tokens) % ps:
            raise ValueError(f"{len(tokens)} tokens is not a multiple of page_size {ps}")
        n = len(tokens) // ps
        if len(pages) != n:
            raise ValueError(f"{len(tokens)} tokens need {n} pages, got {len(pages)}")
        side = [list(map(int, s[:n])) for s in side] if side else [[NULL_PAGE] * n for _ in self.side_pools]
        if len(side) != len(self.side_pools) or any(len(s) != n for s in side):
            raise ValueError(f"side pages must be {len(self.side_pools)} lists of {n} pages")
        tokens = tuple(map(int, tokens))
        node, matched, _ = self._walk(tokens)
        self._refill(node, matched // ps, side)
        if matched < len(tokens):
            new = list(map(int, pages[matched // ps:]))
            if len(set(new)) != len(new) or self._owned.intersection(new):
                raise ValueError(f"pages {new} repeat or are already owned by the tree (aliasing)")
            new_side = [s[matched // ps:] for s in side]
            for i, s in enumerate(new_side):
                live = [p for p in s if p != NULL_PAGE]
                if len(set(live)) != len(live) or self._side_owned[i].intersection(live):
                    raise ValueError(f"side pages {live} repeat or are already owned by the tree (aliasing)")
            self.pool.incref(new)  # raises before any tree change if a page is not allocated
            for i, s in enumerate(new_side):
                self.side_pools[i].incref([p for p in s if p != NULL_PAGE])
                self._side_owned[i].update(p for p in s if p != NULL_PAGE)
            leaf = Node(key=tokens[matched:], value=new, parent=node, last_access=self._clock,
                        serial=next(self._serials), side=new_side)
            node.children[leaf.key[:ps]] = leaf
            self._owned.update(new)
            self._evictable += len(new)
        return matched

    def _refill(self, node: Node, num_pages: int, side: list[list[int]]) -> None:
        """Tombstones on the path to node (num_pages pages long) take the request's live side pages."""
        if not self.side_pools:
            return
        end = num_pages
        while node is not self.root:
            start = end - len(node.value)
            for i, s in enumerate(side):
                for j in range(len(node.value)):
                    p = s[start + j]
                    if node.side[i][j] == NULL_PAGE and p != NULL_PAGE and p not in self._side_owned[i]:
                        self.side_pools[i].incref([p])
                        self._side_owned[i].add(p)
                        node.side[i][j] = p
            end, node = start, node.parent
            assert node is not None

    def set_snapshot(self, tokens: Sequence[int], slot: int) -> bool:
        """Attach snapshot `slot` (the states after the last of `tokens`, which must be cached) to the node
        ending there. False when that point already has one or is not cached: the caller keeps its slot."""
        tokens = self._aligned(tokens)
        node, matched, _ = self._walk(tokens)
        if matched != len(tokens) or node is self.root or node.snapshot is not None:
            return False
        if slot in self._snapshots:
            raise ValueError(f"snapshot slot {slot} is already in the tree")
        node.snapshot = slot
        self._snapshots.add(slot)
        return True

    def match(self, tokens: Sequence[int], need_snapshot: bool = False) -> Hit:
        """The longest cached page-aligned prefix of `tokens` that every cache group can serve: the full-context
        pages, and for each side table the pages holding the last `window - 1` tokens before the hit (what
        the next token attends to); with need_snapshot, only points holding a snapshot. Splits at the hit,
        so `node`'s path is exactly the hit."""
        ps = self.page_size
        node, matched, pages = self._walk(self._aligned(tokens))
        path: list[Node] = []
        n = node
        while n is not self.root:
            path.append(n)
            n = n.parent  # type: ignore[assignment]
        path.reverse()
        side = [[p for nd in path for p in nd.side[i]] for i in range(len(self.side_pools))]
        ends = {0: self.root}
        total = 0
        for nd in path:
            total += len(nd.value)
            ends[total] = nd
        for k in range(matched // ps, 0, -1):
            if need_snapshot and (k not in ends or ends[k].snapshot is None):
                continue
            if all(p != NULL_PAGE for i, w in enumerate(self.windows)
                   for p in side[i][max(0, k * ps - w + 1) // ps:k]):
                break
        else:
            k = 0
        if k == 0:
            return Hit(0, [], [[] for _ in self.side_pools], self.root, None, matched)
        target = ends.get(k)
        if target is None:  # the hit ends inside a node: split there
            start = max(e for e in ends if e < k)
            target = self._split(ends[min(e for e in ends if e > k)], (k - start) * ps)
        out_side = []
        for i, w in enumerate(self.windows):
            first = max(0, k * ps - w + 1) // ps
            out_side.append([NULL_PAGE] * first + side[i][first:k])
        return Hit(k * ps, pages[:k], out_side, target, target.snapshot, matched)

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
                   last_access=child.last_access, serial=next(self._serials), side=[s[:m // ps] for s in child.side])
        # the snapshot stays with the lower part: it marks the end of child, which does not move
        child.key, child.value, child.parent = child.key[m:], child.value[m // ps:], top
        child.side = [s[m // ps:] for s in child.side]
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
            self._drop_extras(node)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.serial, parent))
        return freed

    def _drop_extras(self, node: Node) -> int:
        """Let go of node's side pages and snapshot. Returns the side pages freed in the pools."""
        freed = 0
        for i, s in enumerate(node.side):
            live = [p for p in s if p != NULL_PAGE]
            self._side_owned[i].difference_update(live)
            freed += self.side_pools[i].decref(live)
            node.side[i] = [NULL_PAGE] * len(s)
        if node.snapshot is not None:
            self._snapshots.discard(node.snapshot)
            self.release_snapshot(node.snapshot)
            node.snapshot = None
        return freed

    def evict_side(self, table: int, num_pages: int) -> int:
        """Tombstone side pages of table `table`, least recently used nodes first, until the pool got back
        >= num_pages pages or the tree holds none. Locks do not matter: a request holds its own references."""
        pool, owned, freed = self.side_pools[table], self._side_owned[table], 0
        for node in sorted(self._nodes(), key=lambda n: (n.last_access, n.serial)):
            if freed >= num_pages:
                break
            live = [p for p in node.side[table] if p != NULL_PAGE]
            if live:
                owned.difference_update(live)
                freed += pool.decref(live)
                node.side[table] = [NULL_PAGE] * len(node.value)
        return freed

    def evict_snapshots(self, num: int) -> int:
        """Drop the snapshots of the least recently used nodes (any lock state) until num are released."""
        dropped = 0
        for node in sorted(self._nodes(), key=lambda n: (n.last_access, n.serial)):
            if dropped >= num:
                break
            if node.snapshot is not None:
                self._snapshots.discard(node.snapshot)
                self.release_snapshot(node.snapshot)
                node.snapshot = None
                dropped += 1
        return dropped

    @property
    def snapshots(self) -> int:
        return len(self._snapshots)

    def side_pages_of(self, table: int) -> set[int]:
        """Every page of side table `table` the tree owns (one pool reference each)."""
        return set(self._side_owned[table])

    def reset(self) -> None:
        """Drop the whole tree and its page references; only legal when no request holds a lock."""
        if self._protected or any(n.lock_ref for n in self._nodes()):
            raise RuntimeError(f"reset with {self._protected} protected pages: unlock every handle first")
        nodes = list(self._nodes())
        self.pool.decref(p for n in nodes for p in n.value)
        for n in nodes:
            self._drop_extras(n)
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
        side_seen: list[set[int]] = [set() for _ in self.side_pools]
        snaps: set[int] = set()
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
            assert len(n.side) == len(self.side_pools) and all(len(s) == len(n.value) for s in n.side), \
                f"{n}: side pages not aligned with its pages"
            for i, s in enumerate(n.side):
                for p in s:
                    if p != NULL_PAGE:
                        assert p not in side_seen[i], f"side page {p} (table {i}) appears twice in the tree"
                        assert self.side_pools[i].ref(p) >= 1, f"tree side page {p} is free in its pool"
                        side_seen[i].add(p)
            if n.snapshot is not None:
                assert n.snapshot not in snaps, f"snapshot {n.snapshot} owned twice"
                snaps.add(n.snapshot)
            if n.lock_ref:
                protected += len(n.value)
            else:
                evictable += len(n.value)
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"counters evictable={self._evictable} protected={self._protected}, recount {evictable}/{protected}")
        assert seen == self._owned, "owned-page set drifted from the tree"
        assert side_seen == self._side_owned, "owned side-page sets drifted from the tree"
        assert snaps == self._snapshots, "snapshot set drifted from the tree"
