from __future__ import annotations

import pytest

from attnzoo.engine.block_pool import BlockPool, NoFreePages


def test_allocate_free_round_trip():
    pool = BlockPool(4)
    assert pool.capacity == 4 and pool.num_free == 4
    pages = pool.allocate(3)
    assert pages == [0, 1, 2] and pool.num_free == 1
    assert [pool.ref(p) for p in range(4)] == [1, 1, 1, 0]
    assert pool.decref(pages) == 3
    assert pool.num_free == 4 and pool.allocate(0) == []
    pool.check()


def test_sharing_needs_every_reference_released():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.incref([a])
    assert pool.ref(a) == 2
    assert pool.decref([a, b]) == 1  # only b reached 0
    assert pool.decref([a]) == 1
    pool.check()
    with pytest.raises(ValueError):
        pool.incref([a])  # a free page cannot be shared


def test_no_free_pages_changes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreePages, match="asked for 2 pages but only 1"):
        pool.allocate(2)
    assert pool.num_free == 1 and pool.ref(2) == 0
    assert pool.allocate(1) == [2]
    pool.check()


def test_double_free_raises_and_changes_nothing():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.decref([a])
    with pytest.raises(ValueError, match="double free"):
        pool.decref([b, a])
    assert pool.ref(b) == 1  # b was not released by the failed call
    with pytest.raises(ValueError, match="double free"):
        pool.decref([b, b])  # one reference, released twice in one call
    assert pool.ref(b) == 1
    pool.check()


def test_most_recently_freed_pages_are_reused_first():
    pool = BlockPool(4)
    pages = pool.allocate(4)
    pool.decref([pages[2]])
    pool.decref([pages[0], pages[3]])
    assert pool.allocate(3) == [3, 0, 2]  # the pages touched last come back first


def test_out_of_range_page():
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.ref(2)
    with pytest.raises(ValueError):
        pool.decref([-1])
