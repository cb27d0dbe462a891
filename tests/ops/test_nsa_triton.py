"""NSA on its Triton kernels (compression branch on the token-sparse kernel, selection on the block-sparse
kernel, window on the flash kernel), forward and backward, run on CPU through the Triton interpreter and
compared with the torch form in float64 (itself checked against the paper's float64 loop in test_nsa.py).

Output buffers start as NaN (ATTNZOO_TRITON_POISON=1). Tolerance as test_sparse_triton.py:
|triton - ref64| <= 2 * |torch_fp32 - ref64| + eps, for the output and every gradient.
ATTNZOO_TRITON_TEST_DEVICE=cuda runs the same cases compiled.
"""

from __future__ import annotations


import pytest
import torch

from attnzoo.ops.nsa import nsa, nsa_compress_keys
from tests.ops.triton_env import DEVICE, import_kernels, poison_outputs  # noqa: F401  (poison_outputs: an autouse fixture)

import_kernels("attnzoo.ops.attention.triton.op", "attnzoo.ops.sparse.triton_kernels")


NAMES = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win"]


def _case(seed: int, B: int, T: int, H: int, Hkv: int, dk: int, l: int, d: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = {n: torch.randn(B, T, Hkv, dk, generator=g, dtype=torch.float64) for n in NAMES[1:7]}
    # compressed keys/values: mean pooling of the raw compression set (a learned compressor is upstream)
    raw["k_cmp"], raw["v_cmp"] = (nsa_compress_keys(raw[n], l, d, "mean") * 2.0 for n in ("k_cmp", "v_cmp"))
    raw["q"] = torch.randn(B, T, H, dk, generator=g, dtype=torch.float64)
    for n in NAMES[7:]:
        raw[n] = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    return {n: raw[n] for n in NAMES}


def _run(ins: dict[str, torch.Tensor], dtype: torch.dtype, backend: str, go: torch.Tensor, **kw
         ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in ins.values()]
    o, idx = nsa(*leaves, return_block_indices=True, backend=backend, **kw)
    grads = torch.autograd.grad((o.double() * go.to(DEVICE)).sum(), leaves, allow_unused=True)
    return o, idx, list(grads)


@pytest.mark.parametrize("T,l,d,l_sel,n,window,reduce", [
    (80, 8, 4, 16, 4, 8, "sum"),      # paper: overlapping compression blocks, l' = 2l, a window branch
    (67, 16, 16, 16, 3, None, "mean"),  # fla: l = d = l', no window, a ragged last block
])
def test_triton_matches_torch_outputs_selection_and_gradients(T, l, d, l_sel, n, window, reduce):
    # one sequence: the interpreter's time grows with the grid; batches of 2 run in the packed test below
    B, H, Hkv, dk = 1, 4, 2, 16
    ins = _case(T, B, T, H, Hkv, dk, l, d)
    kw = dict(l=l, d=d, l_sel=l_sel, n=n, window=window, reduce=reduce)
    go = torch.randn(B, T, H, dk, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o64, idx64, g64 = _run(ins, torch.float64, "torch", go, **kw)
    o32, _, g32 = _run(ins, torch.float32, "torch", go, **kw)
    ot, idxt, gt = _run(ins, torch.float32, "triton", go, **kw)
    assert torch.equal(idxt.cpu(), idx64), "the Triton path selected other blocks"
    for what, a, ref, same in [("out", ot, o64, o32)] + list(zip(NAMES, gt, g64, g32)):
        if ref is None:  # no window branch: its inputs are unused on every path
            assert a is None and window is None and what.endswith("_win"), what
            continue
        a, ref, same = a.detach().cpu().double(), ref.detach(), same.detach().double()
        assert not a.isnan().any(), f"{what}: NaN (an element the kernels never wrote?)"
        assert ref.abs().max() > 0, what
        tol = 2 * (same - ref).abs() + 1e-5 * (1 + ref.abs())
        bad = (a - ref).abs() > tol
        assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max err {(a - ref).abs().max():.2e}"


def test_queries_before_the_first_block_output_only_their_window():
    """Rows that see no compressed block: the compression branch gives 0 (no NaN in either direction)."""
    B, T, H, Hkv, dk, l, d = 1, 12, 2, 1, 16, 8, 4
    ins = _case(3, B, T, H, Hkv, dk, l, d)
    ins["g_slc"] = torch.zeros_like(ins["g_slc"])
    ins["g_win"] = torch.zeros_like(ins["g_win"])
    go = torch.randn(B, T, H, dk, dtype=torch.float64)
    ot, _, gt = _run(ins, torch.float32, "triton", go, l=l, d=d, l_sel=16, n=2, window=4)
    assert (ot[0, : l - 1] == 0).all() and (ot[0, l - 1:] != 0).any()
    assert all(not g.isnan().any() for g in gt if g is not None)


def test_backend_is_validated_and_float64_stays_on_torch():
    ins = _case(5, 1, 32, 2, 1, 8, 8, 4)
    kw = dict(l=8, d=4, l_sel=16, n=2, window=8)
    with pytest.raises(ValueError, match="sparse attention backend"):
        nsa(*ins.values(), backend="cuda", **kw)
    # float64 is the oracle dtype: the Triton request falls back to the torch form, bit for bit
    assert torch.equal(nsa(*ins.values(), backend="triton", **kw), nsa(*ins.values(), backend="torch", **kw))


@pytest.mark.slow   # 31 s in the interpreter; the per-shape parity tests above run in CI
def test_packed_mixed_lengths_on_triton():
    """A training step's packing (several sequences of a few lengths): the Triton form per length group
    equals the float64 torch form, output and the query's gradient."""
    from attnzoo.ops.nsa import compressed_cu_seqlens
    g = torch.Generator().manual_seed(8)
    H, Hkv, dk, l, d, l_sel = 4, 2, 16, 8, 4, 16
    cu = torch.tensor([0, 48, 96, 117], dtype=torch.int32)   # lengths 48, 48, 21: a batch of 2 and one alone
    N, nc = int(cu[-1]), int(compressed_cu_seqlens(cu, l, d)[-1])
    ins = [torch.randn(N, H, dk, generator=g, dtype=torch.float64)]
    ins += [torch.randn(nc, Hkv, dk, generator=g, dtype=torch.float64) for _ in range(2)]
    ins += [torch.randn(N, Hkv, dk, generator=g, dtype=torch.float64) for _ in range(4)]
    ins += [torch.rand(N, H, generator=g, dtype=torch.float64) for _ in range(3)]
    kw = dict(l=l, d=d, l_sel=l_sel, n=3, window=8, cu_seqlens=cu)

    def run(dtype, backend, device):
        leaves = [x.to(device, dtype).requires_grad_() for x in ins]
        o = nsa(*leaves, backend=backend, **{**kw, "cu_seqlens": cu.to(device)})
        return o.detach().cpu().double(), torch.autograd.grad(o.sum(), leaves[0])[0].cpu().double()

    (o64, dq64), (o32, dq32), (ot, dqt) = run(torch.float64, "torch", "cpu"), run(torch.float32, "torch", "cpu"), \
        run(torch.float32, "triton", DEVICE)
    for a, ref, same in ((ot, o64, o32), (dqt, dq64, dq32)):
        assert ((a - ref).abs() <= 2 * (same - ref).abs() + 1e-5 * (1 + ref.abs())).all()
