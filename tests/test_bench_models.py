"""The benches that load the default model (or serve it) run end to end at tiny sizes (their --quick mode), so
none rots; timings are not checked. (The op and mechanism benches: tests/test_bench_ops.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

# the suite's time budget (15 minutes on a 2-core CPU): the benches whose --quick alone takes 30 s to 2.5 min there
# run with --runslow (`make test-all`); generate_cpu stands for them in `make test`
_SLOW = ["throughput", "deterministic", "soak", "quant_cpu", "quant_answers", "speculative"]
BENCHES = ["generate_cpu"] + [pytest.param(b, marks=pytest.mark.slow) for b in _SLOW]


def run_quick(name: str) -> None:
    r = subprocess.run([sys.executable, "-m", "attnzoo.cli", "bench", name, "--quick"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "machine" in r.stdout and "FAILED" not in r.stdout
    assert "|" in r.stdout  # a table was printed


@pytest.mark.parametrize("name", BENCHES)
def test_bench_quick_runs_and_checks_correctness(name):
    run_quick(name)


def test_unknown_bench_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "attnzoo.cli", "bench", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "available" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bench_structured_quick_runs_and_checks_correctness():
    """bench/structured.py --quick: constrained outputs validated against their schemas, llguidance's masks walk a
    valid document (the engine's structured outputs end to end; vLLM and xgrammar are left out)."""
    run_quick("structured")
