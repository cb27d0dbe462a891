"""MLA decode over a paged latent cache: reference vs a float64 hand computation, the torch form and the
Triton kernel (in the interpreter on CPU, with ATTNZOO_TRITON_POISON=1 so an unwritten element is NaN)
vs the reference. Tolerance rule (tests/ops/tolerance.py): |out - ref64| <= 2 * |ref_same - ref64| + eps.
ATTNZOO_TRITON_TEST_DEVICE=cuda runs the Triton cases compiled on a GPU instead.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable

import pytest
import torch

from torch import Tensor

from attnzoo.ops.latent.paged import mla_paged_decode, mla_paged_decode_reference, mla_paged_decode_torch
from tests.ops.tolerance import close

DEVICE = os.environ.get("ATTNZOO_TRITON_TEST_DEVICE", "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (tests run its interpreter on CPU)")
EPS = {torch.float32: 1e-5, torch.float16: 2e-3}
F32, F16, F64 = torch.float32, torch.float16, torch.float64
LENS = [1, 17, 63, 130]


Case = tuple[Tensor, Tensor, Tensor, Tensor]   # q, cache, block_table, seq_lens
Kernel = Callable[..., Tensor]


def _case(lens: list[int], H: int, D: int, page: int, dtype: torch.dtype, seed: int = 0) -> Case:
    """A shuffled page pool (sequences' pages interleave, spare pages hold junk) and one query each;
    block-table entries past a sequence's pages are junk too (an out-of-range page id, so reading one fails)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // page) for L in lens]
    P = sum(need) + 3
    perm = torch.randperm(P, generator=g)
    table = torch.full((len(lens), max(max(need), 1) + 1), 10**6, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    cache = torch.randn(P, page, D, generator=g).to(dtype)
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    return q, cache, table, torch.tensor(lens, dtype=torch.int32)


def _refs(q: Tensor, cache: Tensor, table: Tensor, lens: Tensor, dv: int, scale: float) -> tuple[Tensor, Tensor]:
    return (mla_paged_decode_reference(q.double(), cache.double(), table, lens, dv, scale),
            mla_paged_decode_reference(q, cache, table, lens, dv, scale))


def test_reference_matches_hand_computation() -> None:
    q, cache, table, lens = _case([5, 0, 20], 3, 12, 4, F64)
    dv, scale = 8, 0.37
    out = mla_paged_decode_reference(q, cache, table, lens, dv, scale)
    for b, L in enumerate(lens.tolist()):
        rows = [cache[int(table[b, j // 4]), j % 4] for j in range(L)]
        for h in range(3):
            if L == 0:
                assert out[b, h].abs().max() == 0
                continue
            logits = [scale * float(q[b, h] @ k) for k in rows]
            m = max(logits)
            w = [math.exp(x - m) for x in logits]
            want = sum(wi * k[:dv] for wi, k in zip(w, rows)) / sum(w)
            assert torch.allclose(out[b, h], want, atol=1e-12)


@pytest.mark.parametrize("dtype", [F32, F16, F64])
@pytest.mark.parametrize("page", [16, 64])
def test_torch_matches_reference(dtype: torch.dtype, page: int) -> None:
    q, cache, table, lens = _case(LENS + [0], 12, 96, page, dtype)
    ref64, same = _refs(q, cache, table, lens, 64, 0.135)
    out = mla_paged_decode_torch(q, cache, table, lens, 64, 0.135)
    assert out.dtype == dtype
    close(out, ref64, same, EPS.get(dtype, 1e-12))
    assert out[-1].abs().max() == 0  # seq_len 0 -> zeros


def test_torch_all_empty_and_bad_shapes() -> None:
    q, cache, table, lens = _case([0, 0], 4, 24, 8, F32)
    assert torch.equal(mla_paged_decode_torch(q, cache, table, lens, 16, 0.2), torch.zeros(2, 4, 16))
    with pytest.raises(ValueError, match="Dqk"):
        mla_paged_decode_torch(q, cache[..., :20], table, lens, 16, 0.2)


@pytest.fixture
def interp(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    """The interpreter must be on when the kernel module is first imported (triton.jit reads it then)."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNZOO_TRITON_POISON", "1")
    from attnzoo.ops.latent.triton_kernels import mla_paged_decode_triton
    return mla_paged_decode_triton


@needs_triton
@pytest.mark.parametrize("H,D,dv,page,chunk,block_h", [
    (16, 96, 64, 16, None, None),
    (12, 96, 64, 16, 32, None),     # padded heads, several splits
    (12, 96, 64, 64, 64, 16),
    (20, 96, 64, 16, 32, 16),       # two head blocks, the second mostly padding
    (16, 576, 512, 64, 64, None),   # the DeepSeek-V3 shape
    (12, 576, 512, 16, 32, None),
])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_triton_matches_reference(interp: Kernel, H: int, D: int, dv: int, page: int, chunk: int | None,
                                  block_h: int | None, dtype: torch.dtype) -> None:
    q, cache, table, lens_t = _case(LENS, H, D, page, dtype, seed=H + page)
    ref64, same = _refs(q, cache, table, lens_t, dv, 0.135)
    dev = [t.to(DEVICE) for t in (q, cache, table, lens_t)]
    out = interp(*dev, dv, 0.135, chunk=chunk, block_h=block_h).cpu()
    assert out.dtype == dtype
    close(out, ref64, same, EPS[dtype])


@needs_triton
def test_triton_empty_sequence_no_rope_and_poison(interp: Kernel) -> None:
    q, cache, table, lens = _case([0, 17, 33], 12, 64, 16, F32)
    # dv == Dqk (GLM-5.3-Flash: no rope part) and a zero-length sequence: zeros, never the NaN poison
    out = interp(*[t.to(DEVICE) for t in (q, cache, table, lens)], 64, 0.2, chunk=32).cpu()
    assert out[0].abs().max() == 0
    close(out, *_refs(q, cache, table, lens, 64, 0.2), EPS[F32])
    from attnzoo.ops.triton_host import alloc
    # the poison is on, so every element checked above was written by the kernels
    assert alloc((2,), F32, torch.device(DEVICE)).isnan().all()


@needs_triton
def test_dispatcher_follows_the_attention_backend(interp: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """mla_paged_decode asks the attention family's resolver: "triton" runs the kernel, any other form torch."""
    case = [t.to(DEVICE) for t in _case([5, 40], 16, 96, 16, F32)]
    kernel, torch_form = interp(*case, 64, 0.2), mla_paged_decode_torch(*case, 64, 0.2)
    assert not torch.equal(kernel, torch_form)  # the two forms round differently, so the choice shows
    assert torch.equal(mla_paged_decode(*case, 64, 0.2, backend="triton"), kernel)
    assert torch.equal(mla_paged_decode(*case, 64, 0.2, backend="torch"), torch_form)
    monkeypatch.setenv("ATTNZOO_BACKEND", "blockwise")
    assert torch.equal(mla_paged_decode(*case, 64, 0.2), torch_form)
    monkeypatch.setenv("ATTNZOO_BACKEND", "triton")
    assert torch.equal(mla_paged_decode(*case, 64, 0.2), kernel)
