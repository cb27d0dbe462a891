"""How far apart two arena numbers must be before the report calls them different.

Each run's figure gets a 95 % bootstrap interval over its evaluation units (validation windows for the LM
track, test sequences for the recall track): the noise of a finite test set. A mechanism trained with several
seeds gets the envelope of its seeds' intervals (lowest lower bound to highest upper bound), which also
covers the seed-to-seed spread. Two mechanisms whose intervals overlap are "not distinguishable" at this
scale; the claims table says so instead of reading a difference into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    seeds: int = 1

    def __post_init__(self) -> None:
        if not self.lo <= self.mean <= self.hi:
            raise ValueError(f"interval [{self.lo}, {self.hi}] does not hold its mean {self.mean}")

    def overlaps(self, other: Interval) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def bootstrap(values: Sequence[float], reps: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of `values` (one number per evaluation unit)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D sample, got shape {v.shape}")
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    m = float(v.mean())
    return Interval(m, min(float(lo), m), max(float(hi), m))


def over_seeds(runs: Sequence[Interval]) -> Interval:
    """One mechanism's interval from its seeds: the mean of their means inside the envelope of their intervals."""
    if not runs:
        raise ValueError("over_seeds needs at least one run")
    return Interval(float(np.mean([r.mean for r in runs])), min(r.lo for r in runs), max(r.hi for r in runs),
                    seeds=sum(r.seeds for r in runs))


def compare(a: Interval, b: Interval, higher_is_better: bool = True) -> str:
    """"better" / "worse" (a against b) when the intervals are apart, else "not distinguishable"."""
    if a.overlaps(b):
        return "not distinguishable"
    return "better" if (a.mean > b.mean) == higher_is_better else "worse"


def verdict(a: Interval, b: Interval, claim: str, higher_is_better: bool = True) -> str:
    """A claim about a against b -> "supported" / "contradicted" / "not distinguishable".

    claim: "better" (a beats b), "worse" (a falls short of b), "match" (a matches or beats b: only a
    distinguishable shortfall contradicts it; overlap cannot prove equality, so it stays not distinguishable)."""
    if claim not in ("better", "worse", "match"):
        raise ValueError(f"claim must be better, worse or match, got {claim!r}")
    c = compare(a, b, higher_is_better)
    if c == "not distinguishable":
        return c
    if claim == "match":
        return "supported" if c == "better" else "contradicted"
    return "supported" if c == claim else "contradicted"


__all__ = ["Interval", "bootstrap", "compare", "over_seeds", "verdict"]
