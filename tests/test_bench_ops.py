"""The op, mechanism and engine-overhead benches run end to end at tiny sizes (their --quick mode), so none rots;
timings are not checked."""

from __future__ import annotations

import pytest

from tests.test_bench_models import run_quick

BENCHES = ["attention_cpu", "prefix_cache", "flash_cpu", "mla", "delta_rule", "sparse", "hybrid", "step_overhead",
           "arena_speed"]


@pytest.mark.parametrize("name", BENCHES)
def test_bench_quick_runs_and_checks_correctness(name):
    run_quick(name)
