"""Shared pytest setup: the `slow` marker runs only with --runslow; --fuzz-seed picks the server fuzz test's
seeds."""

from __future__ import annotations

import os

import pytest

# Triton decides between compiled and interpreted functions when it is imported (its own standard
# library is @jit-decorated), and other test modules (transformers) may import it first. Without a GPU
# the interpreter is the only way to run our kernels, so turn it on before any import.
if os.environ.get("ATTNZOO_TRITON_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Engines in tests stay eager unless a test asks for the compiled decode step (enforce_eager=False): a background
# compile per engine would spend the suite's time on Inductor (tests/engine/test_graph.py covers that path).
os.environ.setdefault("ATTNZOO_ENFORCE_EAGER", "1")

# `make test` runs two pytest-xdist workers (one file per worker at a time): most tests are many small ops that
# use one core, so the second worker uses the other. Each worker gets its share of the cores for torch's
# threads and, through OMP_NUM_THREADS, for the processes the tests start (benches, engine cores, TP ranks):
# two workers at full width would oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    import torch

    torch.set_num_threads(_THREADS)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--fuzz-seed", action="append", type=int, default=[], metavar="N",
                     help="run the server fuzz test (tests/server/test_fuzz.py) with seed N instead of its fixed CI "
                          "seeds: replays a reported failure, or tries new cases; repeatable")


# The longest files start first: `--dist loadfile` hands files out in collection order, and a long file taken
# last keeps one worker busy after the other has finished.
LONGEST_FIRST = ["tests/test_bench_models.py", "tests/test_bench_ops.py", "tests/arena/test_ddp.py",
                 "tests/server/test_disconnects.py", "tests/engine/test_speculative.py", "tests/engine/test_llm.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {f: i for i, f in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))   # stable: the rest keep order
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


if _WORKERS > 1:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
        """xdist sends each report to the controller as UTF-8, and a worker whose report cannot be encoded dies
        with every test it had left. Tests that feed the server lone surrogates (test_errors, test_fuzz) get them
        back in captured logs: escape them there, as `\\udXXX`."""
        outcome = yield
        report = outcome.get_result()
        report.sections = [(k, v.encode("utf-8", "backslashreplace").decode("utf-8")) for k, v in report.sections]
