"""bench/gpu_check.py runs only on a GPU; here: its CPU exit path and its pure helpers."""

from __future__ import annotations

import datetime
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", PATH)
assert spec is not None and spec.loader is not None
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_clearly_without_cuda() -> None:
    r = subprocess.run([sys.executable, str(PATH)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_flops_and_bytes() -> None:
    assert gpu_check.attn_flops(1, 1, 2, 3, causal=False) == 4 * 2 * 2 * 3
    assert gpu_check.attn_flops(2, 4, 1024, 128, causal=True) == 4 * 2 * 4 * 1024**2 * 128 / 2
    assert gpu_check.attn_flops(1, 1, 8, 2, causal=True, backward=True) == 2.5 * 4 * 64 * 2 / 2
    assert gpu_check.attn_flops(1, 1, 1, 2, causal=False, Tk=10) == 4 * 10 * 2
    assert gpu_check.decode_bytes(32, 8192, 8, 128, 2) == 2 * 32 * 8192 * 8 * 128 * 2


def test_helpers() -> None:
    assert gpu_check.rel_err(torch.ones(3), torch.ones(3)) == 0
    assert gpu_check.rel_err(torch.tensor([float("nan")]), torch.ones(1)) == float("inf")
    md, js = gpu_check.result_paths("NVIDIA H200 (x/y)", datetime.date(2026, 1, 2), Path("/r"))
    assert md == Path("/r/gpu_check-2026-01-02-NVIDIA-H200-x-y.md") and js.suffix == ".json"
    table = gpu_check.markdown([{"a": 1.23456, "b": None}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 |  |"]
