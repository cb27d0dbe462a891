"""The op, mechanism and engine-overhead benches run end to end at tiny sizes (their --quick mode), so none rots;
timings are not checked."""

from __future__ import annotations

import pytest

from tests.test_bench_models import run_quick

# flash_cpu, delta_rule and sparse take 25-35 s each on the 2-core EPYC: --runslow (their ops' tests run in CI);
# the arena grid's and efficiency benches too (tests/arena/test_grid.py runs the grid itself)
SLOW = ("flash_cpu", "delta_rule", "sparse", "arena_grid", "arena_efficiency")
BENCHES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
           for n in ["attention_cpu", "prefix_cache", "flash_cpu", "mla", "delta_rule", "sparse", "hybrid",
                     "step_overhead", "arena_speed", "arena_grid", "arena_efficiency"]]


@pytest.mark.parametrize("name", BENCHES)
def test_bench_quick_runs_and_checks_correctness(name):
    run_quick(name)
