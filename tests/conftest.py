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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--fuzz-seed", action="append", type=int, default=[], metavar="N",
                     help="run the server fuzz test (tests/server/test_fuzz.py) with seed N instead of its fixed CI "
                          "seeds: replays a reported failure, or tries new cases; repeatable")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
