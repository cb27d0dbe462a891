"""The noise computation on known inputs: bootstrap intervals cover what they should and shrink with more
data, seeds widen a mechanism's interval, and overlapping intervals are "not distinguishable"."""

from __future__ import annotations

import numpy as np
import pytest

from attnzoo.arena.noise import Interval, bootstrap, compare, over_seeds, verdict


def test_bootstrap_of_known_samples():
    assert bootstrap([0.5] * 10) == Interval(0.5, 0.5, 0.5)          # no spread, no width
    coin = np.random.default_rng(0).integers(0, 2, 400).astype(float)
    iv = bootstrap(coin)
    se = coin.std() / np.sqrt(len(coin))                              # the normal approximation: ±1.96 se
    assert iv.mean == pytest.approx(coin.mean())
    assert iv.hi - iv.lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    small = bootstrap(coin[:25])
    assert small.hi - small.lo > 2.5 * (iv.hi - iv.lo)                 # 16x fewer units: ~4x wider
    assert bootstrap(coin, seed=0) == bootstrap(coin, seed=0)          # deterministic
    with pytest.raises(ValueError):
        bootstrap([])


def test_seeds_give_the_envelope():
    a, b = Interval(0.90, 0.85, 0.95), Interval(0.70, 0.60, 0.80)
    both = over_seeds([a, b])
    assert (both.mean, both.lo, both.hi, both.seeds) == (pytest.approx(0.80), 0.60, 0.95, 2)
    with pytest.raises(ValueError):
        Interval(1.0, 0.0, 0.5)


@pytest.mark.parametrize("a,b,higher,expect", [
    ((0.9, 0.85, 0.95), (0.5, 0.4, 0.6), True, "better"),
    ((0.9, 0.85, 0.95), (0.5, 0.4, 0.6), False, "worse"),        # losses: lower is better
    ((0.9, 0.85, 0.95), (0.8, 0.70, 0.85), True, "not distinguishable"),   # touching counts as overlap
    ((0.5, 0.4, 0.6), (0.9, 0.85, 0.95), True, "worse"),
])
def test_compare(a, b, higher, expect):
    assert compare(Interval(*a), Interval(*b), higher) == expect


def test_verdicts():
    hi, lo, mid = Interval(0.9, 0.85, 0.95), Interval(0.1, 0.05, 0.15), Interval(0.88, 0.8, 0.9)
    assert verdict(hi, lo, "better") == "supported" and verdict(lo, hi, "better") == "contradicted"
    assert verdict(lo, hi, "worse") == "supported" and verdict(hi, lo, "worse") == "contradicted"
    assert verdict(hi, lo, "match") == "supported" and verdict(lo, hi, "match") == "contradicted"
    assert verdict(hi, mid, "better") == verdict(hi, mid, "match") == "not distinguishable"
    with pytest.raises(ValueError):
        verdict(hi, lo, "equal")
