"""Shared bench helpers: name the machine, time a callable."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attnzoo.models.registry import cpu_flags  # noqa: E402,F401  (benches print it beside every figure)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"




def machine() -> str:
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def auto_dtype_name() -> str:
    """The float dtype `dtype="auto"` picks on this machine's CPU, by name ("float32" or "bfloat16")."""
    from attnzoo.models.registry import resolve_dtype
    return str(resolve_dtype("auto")).removeprefix("torch.")


def markdown(rows: list[dict], cols: list[str] | None = None) -> str:
    """A markdown table of dict rows (columns: `cols`, else every key in first-seen order)."""
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))

    def cell(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else ("" if x is None else str(x))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def median_s(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def prefill_and_decode(llm, prompt: list[int], steps: int) -> tuple[float, float]:
    """One greedy sequence through an engine `llm` (attnzoo.LLM): (seconds from adding the prompt to its first
    token, i.e. the chunked prefill; median seconds of the `steps` decode steps after it)."""
    from attnzoo.engine import SamplingParams
    llm.add_request(prompt, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    while not any(o.token_ids for o in llm.step()):
        pass
    prefill = time.perf_counter() - t0
    times = []
    while llm.has_unfinished():
        t = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - t)
    return prefill, statistics.median(times)
