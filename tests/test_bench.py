"""Every bench runs end to end at tiny sizes (its --quick mode), so none rots; timings are not checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

BENCHES = ["attention_cpu", "generate_cpu", "throughput", "prefix_cache", "flash_cpu", "mla", "delta_rule", "sparse", "hybrid",
           "deterministic", "soak", "quant_cpu", "quant_answers", "step_overhead", "arena_speed"]


@pytest.mark.parametrize("name", BENCHES)
def test_bench_quick_runs_and_checks_correctness(name):
    r = subprocess.run([sys.executable, "-m", "attnzoo.cli", "bench", name, "--quick"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "machine" in r.stdout and "FAILED" not in r.stdout
    assert "|" in r.stdout  # a table was printed


def test_unknown_bench_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "attnzoo.cli", "bench", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "available" in r.stderr and "Traceback" not in r.stderr
