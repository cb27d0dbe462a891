"""How every op family picks the form it runs: one resolver for attention, sparse attention and the delta rule.

Order: the op's `backend=` argument; else, inside `ops.batch_invariant.batch_invariant()`, the family's
"invariant" form when it has one; else the family's environment variable; else "triton" for CUDA tensors
when triton imports, else "torch". Triton forms are imported on first use (a CPU install needs no triton)
and take CPU tensors only under TRITON_INTERPRET=1 (the tests run kernels that way).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Collection, Mapping
from functools import cache
from types import ModuleType
from typing import Any

from torch import Tensor

from attnzoo.ops import batch_invariant

ENV_VARS = {"attention": "ATTNZOO_BACKEND", "sparse": "ATTNZOO_SPARSE_BACKEND", "delta_rule": "ATTNZOO_DELTA_BACKEND"}
LABELS = {"attention": "attention", "sparse": "sparse attention", "delta_rule": "delta rule"}


@cache
def triton_module(name: str) -> ModuleType | None:
    """The module holding a family's Triton forms, or None when triton is missing or fails to initialise
    (imported once; never breaks `import attnzoo`)."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def resolve(family: str, backend: str | None, x: Tensor | None, forms: Collection[str],
            triton: str | None = None) -> str:
    """The name of the form to run. `forms` are the family's always-available forms; `triton` names the
    module with its Triton forms (None: the family has none). The env var is read per call so tests can
    monkeypatch it."""
    if backend is None and "invariant" in forms and batch_invariant.enabled():
        return "invariant"
    label, env = LABELS[family], ENV_VARS[family]
    name = backend if backend is not None else os.environ.get(env, "")
    if not name:
        cuda = x is not None and x.is_cuda
        name = "triton" if triton and cuda and triton_module(triton) is not None else "torch"
    if name in forms:
        return name
    allowed = ", ".join(sorted([*forms, *(["triton"] if triton else [])]))
    if name == "triton" and triton:
        if triton_module(triton) is None:
            raise ValueError(f"{label} backend 'triton' is not available (triton does not import); allowed: {allowed}")
        if x is not None and not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"{label} backend 'triton' is not available for CPU tensors (CUDA only; "
                             f"TRITON_INTERPRET=1 runs it slowly on CPU for tests); allowed: {allowed}")
        return name
    raise ValueError(f"unknown {label} backend {name!r} ({env} or backend=); allowed: {allowed}")


def kernel(family: str, backend: str | None, x: Tensor | None, forms: Mapping[str, Any],
           triton: tuple[str, str] | None = None) -> Any:
    """The implementation to call: `forms[name]`, or attribute `triton[1]` of module `triton[0]`."""
    name = resolve(family, backend, x, forms, triton[0] if triton else None)
    if name != "triton":
        return forms[name]
    assert triton is not None
    module = triton_module(triton[0])
    assert module is not None  # resolve checked
    return getattr(module, triton[1])

