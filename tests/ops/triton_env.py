"""What the Triton test modules share: the device they run on, their kernels imported with the interpreter on,
and the autouse fixture that poisons outputs (import `poison_outputs` into a test module to use it).

On the CPU the kernels run in Triton's interpreter. triton.jit picks interpreter or compiler when a kernel is
defined, so kernel modules are imported with TRITON_INTERPRET=1 and the environment put back afterwards: other
test modules of the process must not see it. ATTNZOO_TRITON_TEST_DEVICE=cuda runs the same cases compiled."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest

DEVICE = os.environ.get("ATTNZOO_TRITON_TEST_DEVICE", "cpu")
INTERPRET = DEVICE == "cpu"


def import_kernels(*names: str) -> list[ModuleType]:
    """Import the named kernel modules as the tests need them (skips the calling module without triton)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton; tests run it in interpreter mode on CPU)",
                    allow_module_level=True)
    saved = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Around each test: the interpreter on (CPU) and every kernel output buffer starting as NaN, so an element
    a kernel never writes fails the comparison."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNZOO_TRITON_POISON", "1")
