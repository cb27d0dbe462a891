"""Page allocator for the paged KV cache: a free stack plus a reference count per page.

Pages are plain ints 0..capacity-1. A page is free iff its ref count is 0, and then it sits on the free
stack. Freed pages go on top and allocation pops the top (a fresh pool hands out 0, 1, 2, ...), so the most
recently freed page is reused first: the cache's memory is allocated untouched, and reuse keeps the set of
pages ever written, which is what the process really holds, as small as the peak number in use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class NoFreePages(RuntimeError):
    def __init__(self, asked: int, free: int):
        super().__init__(f"asked for {asked} pages but only {free} are free")
        self.asked, self.free = asked, free


class BlockPool:
    def __init__(self, num_pages: int):
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self.capacity = num_pages
        self._refs = [0] * num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # the top is the end

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Pop n pages from the top of the free stack, each with ref 1; all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise NoFreePages(n, len(self._free))
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Share allocated pages. Validates everything first so a bad page changes nothing."""
        pages = list(pages)
        for p in pages:
            if self.ref(p) == 0:
                raise ValueError(f"incref of free page {p}")
        for p in pages:
            self._refs[p] += 1

    def decref(self, pages: Iterable[int]) -> int:
        """Drop one reference per listed page; pages reaching 0 go on top of the free stack. Returns how many were freed."""
        counts = Counter(pages)
        for p, c in counts.items():  # a page listed twice needs two references; check before touching anything
            if self.ref(p) < c:
                raise ValueError(f"double free: page {p} has {self._refs[p]} references, decref'd {c} times")
        freed = 0
        for p, c in counts.items():
            self._refs[p] -= c
            if self._refs[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def ref(self, page: int) -> int:
        if not 0 <= page < self.capacity:
            raise ValueError(f"page {page} is outside [0, {self.capacity})")
        return self._refs[page]

    def check(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "free stack holds a page twice"
        assert all(r >= 0 for r in self._refs), "negative ref count"
        zero = {p for p, r in enumerate(self._refs) if r == 0}
        assert free == zero, f"free stack {sorted(free)} != ref-0 pages {sorted(zero)}"
