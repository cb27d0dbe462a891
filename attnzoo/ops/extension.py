"""Whether attnzoo's C++ ops (attnzoo/csrc, built by setup.py into attnzoo._C) are here. Importing the library
registers them with torch.library (`torch.ops.attnzoo.*`); every op has a PyTorch form that runs without it."""

from __future__ import annotations

try:
    from attnzoo import _C  # noqa: F401
    HAVE_KERNEL, KERNEL_ERROR = True, None
except (ImportError, OSError) as e:   # not built, or built against another torch
    HAVE_KERNEL, KERNEL_ERROR = False, f"{type(e).__name__}: {e}"
