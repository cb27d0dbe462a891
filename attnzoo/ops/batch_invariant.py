"""Batch-invariant numerics: a row's result does not depend on the rows computed beside it.

Why results depend on the batch at all: a BLAS picks its kernel, its blocking and its K-split from the
shape of the call, so row i of `x @ w` can round differently when x has 1, 7 or 300 rows (measured on
x86 CPUs in fp32 and bf16, see docs/deterministic.md). Attention adds its own splits (SDPA's query and
key tiles depend on the sequence lengths; cascade attention merges shared prefixes by log-sum-exp).

Inside `batch_invariant()`:
- every CPU `mm`, `addmm` and `bmm` runs as a loop of calls of ONE shape per weight: the rows are cut
  into tiles of `ROWS` rows (the last tile zero-padded), each copied into a 64-byte-aligned buffer, so
  the BLAS sees the same shape, layout and alignment for a row whichever batch it came in;
- `attnzoo.ops.attention` (dense and paged) switches to `attention_invariant` / the invariant paged
  form: fixed key blocks aligned to absolute key positions, per-token query items, an exact max and a
  fixed-shape pairwise sum over blocks (ops/attention/invariant.py);
- reductions over a fixed-size row (norms, softmax over the vocabulary) are already row-local.

What is assumed of the BLAS, and checked by `check_gemm_invariance()`: a call of a fixed shape and
layout computes each output row from that row's input alone, the same way for any row position and
batch count. The overrides are process-wide while any `batch_invariant()` block is open (torch's
library mechanism has no thread-local form): a concurrent non-deterministic computation in another
thread also runs tiled, which changes its rounding, never its correctness.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

ROWS = 16          # rows per GEMM call: small enough that a decode step wastes little, large enough to batch
_ALIGN = 64        # bytes; MKL and oneDNN may take another path for unaligned operands

_lock = threading.Lock()
_depth = 0
_lib: torch.library.Library | None = None


def enabled() -> bool:
    """True while a `batch_invariant()` block is open (in any thread)."""
    return _depth > 0


@contextmanager
def batch_invariant() -> Iterator[None]:
    """Run the enclosed CPU computation batch-invariantly. Re-entrant; process-wide (see module doc)."""
    global _depth, _lib
    with _lock:
        if _depth == 0:
            lib = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():   # "Overriding a previously registered kernel": that is the point
                warnings.simplefilter("ignore")
                lib.impl("mm", _mm, "CPU")
                lib.impl("addmm", _addmm, "CPU")
                lib.impl("bmm", _bmm, "CPU")
            _lib = lib
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _lib is not None:
                _lib._destroy()
                _lib = None


def _aligned(t: Tensor) -> bool:
    return t.data_ptr() % _ALIGN == 0


def _row_tiles(a: Tensor, n_out: int, call: Callable[[Tensor, Tensor], None]) -> Tensor:
    """a [..., M, K] -> out [..., M, n_out], computed as call(a_tile [..., ROWS, K], out_tile) per tile."""
    *lead, M, K = a.shape
    out = a.new_empty(*lead, M, n_out)
    buf_in = buf_out = None
    for i in range(0, M, ROWS):
        n = min(ROWS, M - i)
        src, dst = a[..., i:i + n, :], out[..., i:i + n, :]
        # a full tile of a contiguous 2-D input is already a contiguous, aligned [ROWS, K] block: use it in place
        if not lead and n == ROWS and src.is_contiguous() and _aligned(src) and _aligned(dst):
            call(src, dst)
            continue
        if buf_in is None:
            buf_in = a.new_empty(*lead, ROWS, K)
            buf_out = a.new_empty(*lead, ROWS, n_out)
        buf_in[..., :n, :].copy_(src)
        if n < ROWS:
            buf_in[..., n:, :].zero_()
        call(buf_in, buf_out)
        dst.copy_(buf_out[..., :n, :])
    return out


def _plain(a: Tensor) -> bool:
    """Only floating-point matmuls are tiled (integer ones are exact anyway)."""
    return not a.dtype.is_floating_point or a.numel() == 0


def _mm(a: Tensor, b: Tensor) -> Tensor:
    if _plain(a):
        return torch.mm(a, b, out=a.new_empty(a.shape[0], b.shape[1]))   # the .out overload is not overridden
    return _row_tiles(a, b.shape[1], lambda x, o: torch.mm(x, b, out=o))


def _addmm(bias: Tensor, a: Tensor, b: Tensor, *, beta: float = 1, alpha: float = 1) -> Tensor:
    if _plain(a):
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha, out=a.new_empty(a.shape[0], b.shape[1]))
    if bias.dim() == 2 and bias.shape[0] != 1:   # a per-row bias matrix: tile it with the rows
        out = _row_tiles(a, b.shape[1], lambda x, o: torch.mm(x, b, out=o))
        return out.mul_(alpha).add_(bias, alpha=beta) if beta else out.mul_(alpha)
    return _row_tiles(a, b.shape[1], lambda x, o: torch.addmm(bias, x, b, beta=beta, alpha=alpha, out=o))


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    if _plain(a):
        return torch.bmm(a, b, out=a.new_empty(a.shape[0], a.shape[1], b.shape[2]))
    return _row_tiles(a, b.shape[2], lambda x, o: torch.bmm(x, b, out=o))


def check_gemm_invariance(shapes: list[tuple[int, int]], dtype: torch.dtype, trials: int = 2,
                          seed: int = 0) -> None:
    """Raise RuntimeError unless tiled GEMMs of these (in_features, out_features) shapes give each row the
    same bits whatever its batch: alone, at every position of a tile, among other rows, in long batches.
    This tests the one property of the BLAS `batch_invariant()` relies on (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    with batch_invariant():
        for K, N in shapes:
            w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
            for _ in range(trials):
                x = torch.randn(3 * ROWS + 5, K, generator=g).to(dtype)
                full = torch.nn.functional.linear(x, w)
                perm = torch.randperm(x.shape[0], generator=g)
                shuffled = torch.nn.functional.linear(x[perm], w)
                alone = torch.cat([torch.nn.functional.linear(x[i:i + 1], w) for i in range(ROWS + 1)])
                if not (torch.equal(full[perm], shuffled) and torch.equal(full[:ROWS + 1], alone)):
                    raise RuntimeError(
                        f"this machine's BLAS gives a row different bits depending on its batch ({dtype}, "
                        f"{K}x{N} weight) even with fixed-shape tiles; deterministic mode cannot be guaranteed here")
