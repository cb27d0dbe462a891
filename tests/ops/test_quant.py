"""Quantised weights: GGUF block unpacking against gguf's own dequantize (bit for bit), the packed kernels
against fp32 matmuls of the dequantised weights, quantisation error bounds, row edits, the fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo.ops.quant import (HAVE_INT4, HAVE_INT8, cat_rows, dequantize, fit_int4, fit_int8, fit_q8_0, pack, q_kind,
                               quant_linear, quantize_int4, quantize_int8, unpack_gguf)

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

TYPES = [T.Q4_0, T.Q4_1, T.Q8_0]


def raw_blocks(qt: T, N: int, K: int, seed: int = 0) -> np.ndarray:
    """Random bytes for the codes, finite random fp16 scales (and Q4_1 minima): [N, bytes per row]."""
    rng = np.random.default_rng(seed)
    bs, ts = GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, (N * K // bs, ts), dtype=np.uint8)
    n_scales = 2 if qt == T.Q4_1 else 1
    b[:, :2 * n_scales] = (rng.standard_normal((len(b), n_scales)) * 0.02).astype(np.float16).view(np.uint8)
    return b.reshape(N, -1)


def gguf_ref(raw: np.ndarray, qt: T, N: int, K: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qt), dtype=np.float32).reshape(N, K))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_unpack_matches_gguf_bit_for_bit(qt):
    N, K = 48, 96
    raw = raw_blocks(qt, N, K)
    b = unpack_gguf(raw, qt, (N, K))
    assert torch.equal(b.dequantize(), gguf_ref(raw, qt, N, K))
    assert b.bits == (8 if qt == T.Q8_0 else 4) and b.group_size == 32


@pytest.mark.skipif(not HAVE_INT4, reason="no int4 CPU kernel in this torch")
@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("N", [48, 96, 160])  # one, mixed and several 64-row tiles of the packed layout
def test_q4_packed_matmul_is_exact_in_fp32(qt, N):
    K = 128
    raw = raw_blocks(qt, N, K, seed=N)
    w = gguf_ref(raw, qt, N, K)
    qw = pack(unpack_gguf(raw, qt, (N, K)))
    assert qw.native and qw.kind == "int4"
    assert torch.equal(dequantize(qw), w)  # the reference reads torch's packed layout back exactly
    for M in (1, 7):
        x = torch.randn(M, K)
        assert rel(quant_linear(x, qw), x @ w.T) < 1e-5
    qb = pack(unpack_gguf(raw, qt, (N, K)), dtype=torch.bfloat16)
    x = torch.randn(3, K)
    yb = quant_linear(x.bfloat16(), qb)
    assert yb.dtype == torch.bfloat16 and rel(yb, x @ w.T) < 1e-2  # bf16 scales and activations


@pytest.mark.skipif(not HAVE_INT8, reason="no int8 CPU kernel in this torch")
def test_q8_0_requantised_per_row():
    N, K = 32, 128
    raw = raw_blocks(T.Q8_0, N, K)
    w = gguf_ref(raw, T.Q8_0, N, K)
    qw = pack(unpack_gguf(raw, T.Q8_0, (N, K)))
    assert qw.kind == "int8" and qw.scales.shape == (N,)
    # requantising to one scale per row: error at most half a row step
    assert ((dequantize(qw) - w).abs() <= qw.scales[:, None] / 2 * (1 + 1e-5)).all()
    x = torch.randn(4, K)
    assert rel(quant_linear(x, qw), x @ dequantize(qw).T) < 1e-5
    # a row whose blocks share one scale and reach 127 (as llama.cpp's Q8_0 rows of equal block maxima do)
    # is kept exactly
    b = unpack_gguf(raw, T.Q8_0, (N, K))
    b.d[:] = b.d[:, :1].abs()
    b.q.clamp_(-127, 127)[:, 0] = 127
    assert torch.equal(dequantize(pack(b)), b.dequantize())


def test_quantize_int4_error_bound():
    w = torch.randn(64, 256) * 0.05
    w[3, 5] = 0.9  # an outlier only widens its own group
    w[7, :32] = 0.25  # a constant group: d = 0
    qw = quantize_int4(w, group_size=32)
    g = w.view(64, 8, 32)
    bound = ((g.amax(-1) - g.amin(-1)) / 30).repeat_interleave(32, dim=1) + 1e-6
    err = (dequantize(qw) - w).abs()
    assert (err <= bound).all()
    assert err[7, :32].max() == 0
    x = torch.randn(5, 256)
    assert rel(quant_linear(x, qw), x @ dequantize(qw).T) < 1e-5
    assert rel(quant_linear(x, qw), x @ w.T) < 0.1  # 4 bits: ~4% on Gaussian weights


def test_quantize_int8_error_bound():
    w = torch.randn(48, 96)
    qw = quantize_int8(w)
    bound = w.abs().amax(1, keepdim=True) / 254 * (1 + 1e-5)
    assert ((dequantize(qw) - w).abs() <= bound).all()
    x = torch.randn(3, 96)
    assert rel(quant_linear(x, qw), x @ w.T) < 1e-2


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_fallback_equals_kernel(kind):
    w, x = torch.randn(32, 64), torch.randn(2, 3, 64)
    b = fit_int4(w, 32) if kind == "int4" else fit_int8(w)
    fast, slow = pack(b, kind), pack(b, kind, native=False)
    assert not slow.native
    assert torch.equal(dequantize(slow), dequantize(fast))
    bias = torch.randn(32)
    y = quant_linear(x, slow, bias)
    assert y.shape == (2, 3, 32) and y.dtype == x.dtype
    assert rel(y, x @ dequantize(fast).T + bias) < 1e-5
    assert rel(quant_linear(x, fast, bias), y) < 1e-5


def test_row_edits_before_packing():
    """A loader fuses q/k/v by row concatenation and undoes llama.cpp's head permutation on the blocks:
    the packed result equals the same edits applied to the dequantised float weights."""
    N, K = 32, 64
    parts = [unpack_gguf(raw_blocks(T.Q4_1, N, K, seed=s), T.Q4_1, (N, K)) for s in range(2)]
    parts.append(unpack_gguf(raw_blocks(T.Q4_0, N, K, seed=2), T.Q4_0, (N, K)))
    fused = cat_rows(parts)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))

    def unpermute(a: torch.Tensor, n_heads: int = 4) -> torch.Tensor:  # the loader's unpermute_qk
        return a.reshape(n_heads, a.shape[0] // n_heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    assert torch.equal(parts[0].map_rows(unpermute).dequantize(), unpermute(parts[0].dequantize()))
    perm = torch.randperm(3 * N)
    assert torch.equal(fused.rows(perm).dequantize(), fused.dequantize()[perm])
    qw = pack(fused.map_rows(unpermute))
    assert torch.equal(dequantize(qw), unpermute(fused.dequantize()))
    with pytest.raises(ValueError):
        cat_rows([parts[0], unpack_gguf(raw_blocks(T.Q8_0, N, K), T.Q8_0, (N, K))])


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(32, 48), group_size=32)
    with pytest.raises(ValueError, match="block size"):
        unpack_gguf(np.zeros(100, np.uint8), T.Q4_0, (4, 40))
    with pytest.raises(ValueError, match="features"):
        quant_linear(torch.randn(2, 63), quantize_int8(torch.randn(16, 64)))
    if HAVE_INT4:
        with pytest.raises(ValueError, match="divisible by 16"):
            quantize_int4(torch.randn(24, 64))


def test_q_kinds_keep_gguf_blocks_and_refit_the_rest():
    """The GGUF kinds (C++ kernel, tests/ops/test_quant_kernels.py): each file type packs as itself, exactly;
    other blocks are refit (q4_1 asymmetric, q8_0 symmetric per 32), and q4_0 takes Q4_0 blocks only."""
    N, K = 24, 96
    for qt in TYPES:
        b = unpack_gguf(raw_blocks(qt, N, K, seed=9), qt, (N, K))
        assert q_kind(b) == qt.name.lower()
        assert torch.equal(dequantize(pack(b, q_kind(b))), b.dequantize())
    q41 = unpack_gguf(raw_blocks(T.Q4_1, N, K), T.Q4_1, (N, K))
    with pytest.raises(ValueError, match="q4_1"):
        pack(q41, "q4_0")
    w = torch.randn(N, K) * 0.05
    b8 = fit_q8_0(w)
    assert b8.d.equal(b8.d.half().float())              # fp16 scales, as GGUF stores them
    err = (b8.dequantize() - w).abs().view(N, 3, 32)
    assert (err <= b8.d[..., None] / 2 * (1 + 1e-3)).all()
    qw = pack(fit_int4(w, 32), "q8_0")                  # requantised from the 4-bit weight
    assert qw.kind == "q8_0" and rel(dequantize(qw), fit_int4(w, 32).dequantize()) < 0.01
    qw = pack(fit_int8(w), "q4_1")
    assert qw.kind == "q4_1" and rel(dequantize(qw), w) < 0.1
    with pytest.raises(ValueError, match="divisible by 32"):
        pack(fit_int8(torch.randn(8, 48)), "q8_0")
