"""Row-tiled GEMMs: a row's bits do not depend on its batch, and the overrides come and go with the block."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from attnzoo.ops import batch_invariant as bi
from attnzoo.ops.batch_invariant import ROWS, batch_invariant, check_gemm_invariance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K, N", [(576, 960), (100, 37), (64, 1)])
def test_linear_rows_do_not_depend_on_the_batch(dtype, K, N):
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    x = torch.randn(3 * ROWS + 7, K, generator=g).to(dtype)
    with batch_invariant():
        full = F.linear(x, w, b)
        alone = torch.cat([F.linear(x[i:i + 1], w, b) for i in range(len(x))])
        perm = torch.randperm(len(x), generator=g)
        shuffled = F.linear(x[perm], w, b)
        batched3d = F.linear(x[:30].view(5, 6, K), w, b).view(30, N)      # matmul folds to mm
        strided = F.linear(x.t().contiguous().t(), w, b)                  # a non-contiguous input
    assert torch.equal(full, alone) and torch.equal(full[perm], shuffled)
    assert torch.equal(full[:30], batched3d) and torch.equal(full, strided)
    ref = F.linear(x.double(), w.double(), b.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(full.double(), ref, rtol=tol, atol=tol * K ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bmm_and_einsum_rows_do_not_depend_on_the_batch(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 32, 24, generator=g).to(dtype)          # [h, d, c]: MLA's absorbed projection shape
    x = torch.randn(37, 4, 32, generator=g).to(dtype)           # [n, h, d]
    with batch_invariant():
        full = torch.einsum("nhd,hdc->nhc", x, w)
        parts = torch.cat([torch.einsum("nhd,hdc->nhc", x[i:i + 5], w) for i in range(0, 37, 5)])
        direct = torch.bmm(x.transpose(0, 1), w).transpose(0, 1)
    assert torch.equal(full, parts) and torch.equal(full, direct)
    torch.testing.assert_close(full.double(), torch.einsum("nhd,hdc->nhc", x.double(), w.double()),
                               rtol=3e-2, atol=3e-2)


def test_gradients_flow_through_the_tiled_forms():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(21, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64, requires_grad=True)
    with batch_invariant():
        F.linear(x, w).pow(2).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.linear(x, w).pow(2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_overrides_are_scoped_and_reentrant():
    calls = []
    real = bi._row_tiles

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    x, w = torch.randn(5, 8), torch.randn(3, 8)
    try:
        bi._row_tiles = spy
        assert not bi.enabled()
        with batch_invariant():
            with batch_invariant():
                F.linear(x, w)
            assert bi.enabled()
            F.linear(x, w)
        assert not bi.enabled()
        F.linear(x, w)
        assert len(calls) == 2
        # another thread's block is process-wide too, and its exit restores the kernels
        entered, leave = threading.Event(), threading.Event()

        def worker():
            with batch_invariant():
                entered.set()
                leave.wait(10)

        t = threading.Thread(target=worker)
        t.start()
        entered.wait(10)
        assert bi.enabled()
        F.linear(x, w)
        leave.set()
        t.join()
        assert not bi.enabled()
        F.linear(x, w)
        assert len(calls) == 3
    finally:
        bi._row_tiles = real


def test_integer_matmuls_pass_through():
    a = torch.randint(-5, 5, (7, 3))
    b = torch.randint(-5, 5, (3, 4))
    with batch_invariant():
        assert torch.equal(a @ b, torch.mm(a, b, out=torch.empty(7, 4, dtype=a.dtype)))


def test_check_passes_here_and_fails_on_a_batch_dependent_gemm(monkeypatch):
    check_gemm_invariance([(64, 48), (48, 16)], torch.float32)
    check_gemm_invariance([(64, 48)], torch.bfloat16)
    real = bi._row_tiles

    def leaky(a, n_out, call):   # rounds differently with the number of rows, as an untiled BLAS may
        return real(a, n_out, call) * (1 + 1e-6 * a.shape[-2])

    monkeypatch.setattr(bi, "_row_tiles", leaky)
    with pytest.raises(RuntimeError, match="different bits"):
        check_gemm_invariance([(64, 48)], torch.float32)
