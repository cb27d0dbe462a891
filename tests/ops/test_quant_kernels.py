"""The C++ op attnzoo::q_linear (GGUF Q4_0/Q4_1/Q8_0 blocks) against its PyTorch reference, the reference
against the float matmul of the dequantised weight, the packed layout, and the op's registration.

Tolerances, and why:
- kernel vs reference (every ISA this CPU runs): both quantise the activations with the same fp32 operations,
  so the integer dot products are equal; the scale arithmetic (dw * dx * dot + mw * sx, summed over nb blocks)
  rounds in another order: |difference| <= nb * 2^-22 * S, with S the sum of the terms' magnitudes (nb
  additions of terms each within 2^-24 relative, times 4 for the FMA/non-FMA and product-order differences).
  bf16 outputs may then round to neighbouring bf16 values: one ulp, at most 2^-7 |y|.
- reference vs x @ dequantised(w).T: each activation moves by at most dx / 2 when quantised, so the error of
  row n is at most sum over blocks of dx / 2 * sum |w[n, block]| (plus fp32 rounding, 1e-5 of the scale).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo.ops import quant_kernels as qk
from attnzoo.ops.quant import QuantWeight, dequantize, pack, q_kind, quant_linear, unpack_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

FMTS = list(qk.FMTS)
needs_kernel = pytest.mark.skipif(not qk.HAVE_KERNEL, reason=f"attnzoo._C is not built: {qk.KERNEL_ERROR}")


def isas() -> list[str]:
    """Every instruction set this CPU runs: the portable loops and its best SIMD path (the AVX-512 ones only
    run where the CPU has them)."""
    if not qk.HAVE_KERNEL:
        return []
    best = qk.config()["best"]
    return qk.ISAS[:qk.ISAS.index(best) + 1]


@pytest.fixture
def kernel_config():
    """Restore the op's ISA and panel_m after a test changes them."""
    before = qk.config()
    yield qk.config
    qk.config(isa=qk.ISAS[-1], panel_m=before["panel_m"])


def random_blocks(fmt: str, N: int, K: int, g: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes over their whole range, fp16-exact scales (and Q4_1 minima) of a Gaussian-like weight's size."""
    nb = K // 32
    if fmt == "q8_0":
        q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    else:
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    d = (torch.rand(N, nb, generator=g) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(N, nb, generator=g) * 0.08).half().float() if fmt == "q4_1" else None
    return q, d, m


def terms(x: torch.Tensor, codes, scales, fmt: str, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output: S = sum over blocks of |dw dx dot| + |mw sx| (the size of what the kernel adds up), and the
    activations' quantisation bound sum over blocks of dx / 2 * sum |w|."""
    M, K = x.shape
    nb = K // 32
    qx, dx, sx = qk.quantize_q8(x.float())
    qw, dw, mw = qk.unpack_q(codes, scales, fmt, N)
    dots = torch.einsum("mbj,nbj->mnb", qx.view(M, nb, 32).double(), qw.view(N, nb, 32).double()).float()
    s = (dw * dx[:, None] * dots).abs().sum(-1)
    if mw is not None:
        s = s + sx.abs() @ mw.abs().T
    wf = qw.float().view(N, nb, 32) * dw[..., None] + (0 if mw is None else mw[..., None])
    return s, (dx / 2) @ wf.abs().sum(-1).T


def float_weight(codes, scales, fmt: str, N: int, K: int) -> torch.Tensor:
    return dequantize(QuantWeight(fmt, codes, scales, 32, N, K, native=False))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("N, K", [(1, 32), (13, 96), (77, 288), (40, 576)])  # odd N; K = 288: not a multiple of 256
def test_pack_round_trip_is_exact(fmt, N, K):
    g = torch.Generator().manual_seed(N * K)
    q, d, m = random_blocks(fmt, N, K, g)
    codes, scales = qk.pack_q(q, d, m, fmt)
    G = -(-N // 8)
    assert codes.dtype == torch.uint8 and codes.shape == (G, K // 32, 256 if fmt == "q8_0" else 128)
    assert scales.dtype == torch.int16 and scales.shape == (G, K // 32, 2 if fmt == "q4_1" else 1, 8)
    q2, d2, m2 = qk.unpack_q(codes, scales, fmt, N)
    assert torch.equal(q2, q) and torch.equal(d2, d)
    assert torch.equal(m2, m) if fmt == "q4_1" else (m2 is None) == (fmt == "q8_0")
    if fmt == "q4_0":
        assert torch.equal(m2, -8 * d)


def test_packed_layout_matches_the_header():
    """Spot checks of the layout qkernel.h describes: row 2's code for input 8c + j of block 0 is the high
    nibble of byte 32c + j (Q4), and row 5's is byte (2c) * 32 + 3 * 8 + j (Q8: LO = 0,1,4,5, so row 5 is
    qword 3 of the low half)."""
    K = 64
    q4 = torch.zeros(8, K, dtype=torch.uint8)
    q4[2, 8 * 3 + 1] = 9
    codes, _ = qk.pack_q(q4, torch.ones(8, 2), None, "q4_0")
    assert codes[0, 0, 32 * 3 + 1] == 9 << 4 and codes.sum() == 9 << 4
    q8 = torch.zeros(8, K, dtype=torch.int8)
    q8[5, 32 + 8 * 2 + 4] = -3                   # block 1, chunk 2, input 4
    codes, _ = qk.pack_q(q8, torch.ones(8, 2), None, "q8_0")
    assert codes[0, 1].view(torch.int8)[(2 * 2) * 32 + 3 * 8 + 4] == -3


def test_quantize_q8():
    x = torch.randn(3, 96) * torch.tensor([1e-3, 1.0, 50.0])[:, None]
    x[1, 32:64] = 0                              # an all-zero block: d = 0, codes 0
    q, d, s = qk.quantize_q8(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and (q.view(3, 3, 32).abs().amax(-1)[d > 0] == 127).all()
    assert d[1, 1] == 0 and (q[1, 32:64] == 0).all()
    err = (q.float().view(3, 3, 32) * d[..., None] - x.view(3, 3, 32)).abs()
    assert (err <= d[..., None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(s, d * q.view(3, 3, 32).float().sum(-1))


@needs_kernel
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_kernel_matches_reference(fmt, dtype, bias, kernel_config):
    g = torch.Generator().manual_seed(len(fmt) + (7 if bias else 0) + (3 if dtype == torch.bfloat16 else 0))
    for N, K, M in [(1, 32, 1), (13, 96, 5), (77, 288, 9), (40, 576, 7), (24, 64, 2), (9, 32, 3), (200, 128, 4)]:
        q, d, m = random_blocks(fmt, N, K, g)
        codes, scales = qk.pack_q(q, d, m, fmt)
        x = (torch.randn(M, K, generator=g) * 3).to(dtype)
        b = torch.randn(N, generator=g) if bias else None
        ref = qk.reference_q_linear(x, codes, scales, fmt, N, K, b)
        s, _ = terms(x, codes, scales, fmt, N)
        tol = (K // 32) * 2.0 ** -22 * (s + (b.abs() if bias else 0)) + 1e-30
        if dtype == torch.bfloat16:
            tol = tol + 2.0 ** -7 * ref.float().abs()
        for isa in isas():
            kernel_config(isa=isa)
            y = torch.ops.attnzoo.q_linear(x, codes, scales, qk.FMTS[fmt], N, K, b)
            assert y.dtype == dtype and y.shape == (M, N)
            err = (y.float() - ref.float()).abs()
            assert (err <= tol).all(), f"{isa} N={N} K={K} M={M}: {(err / tol).max():.2f} x the tolerance"


@pytest.mark.parametrize("fmt", FMTS)
def test_reference_is_the_float_matmul_up_to_the_activations_rounding(fmt):
    g = torch.Generator().manual_seed(5)
    N, K, M = 45, 320, 6
    q, d, m = random_blocks(fmt, N, K, g)
    codes, scales = qk.pack_q(q, d, m, fmt)
    w = float_weight(codes, scales, fmt, N, K)
    x = torch.randn(M, K, generator=g)
    x[0, :32] *= 1e-3                           # blocks of very different sizes
    err = (qk.reference_q_linear(x, codes, scales, fmt, N, K) - x @ w.T).abs()
    s, bound = terms(x, codes, scales, fmt, N)
    assert (err <= bound + 1e-5 * s).all()
    assert err.max() > 0                        # the activations are rounded


@needs_kernel
@pytest.mark.parametrize("fmt", FMTS)
def test_panel_path_is_the_float_matmul(fmt, kernel_config):
    """From panel_m rows on, the op multiplies dequantised panels (more than one: N > 512) with at::mm."""
    g = torch.Generator().manual_seed(11)
    N, K, M = 531, 64, 5
    q, d, m = random_blocks(fmt, N, K, g)
    codes, scales = qk.pack_q(q, d, m, fmt)
    w = float_weight(codes, scales, fmt, N, K)
    x, b = torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    kernel_config(panel_m=M)
    y = torch.ops.attnzoo.q_linear(x, codes, scales, qk.FMTS[fmt], N, K, b)
    scale = x.abs() @ w.abs().T + b.abs()
    assert ((y - (x @ w.T + b)).abs() <= 1e-5 * scale).all()
    kernel_config(panel_m=M + 1)
    assert not torch.equal(torch.ops.attnzoo.q_linear(x, codes, scales, qk.FMTS[fmt], N, K, b), y)  # the integer path


@needs_kernel
def test_op_is_registered_with_a_fake_impl():
    g = torch.Generator().manual_seed(3)
    q, d, m = random_blocks("q4_1", 16, 64, g)
    codes, scales = qk.pack_q(q, d, m, "q4_1")
    x = torch.randn(2, 3, 64, generator=g)
    # (opcheck's aot_dispatch checks import and run the AOT compiler: ~10 s; the fake impl is checked here)
    torch.library.opcheck(torch.ops.attnzoo.q_linear.default, (x, codes, scales, 1, 16, 64, torch.randn(16)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    xb = x.bfloat16()
    with FakeTensorMode() as mode:
        y = torch.ops.attnzoo.q_linear(mode.from_tensor(xb), mode.from_tensor(codes),
                                       mode.from_tensor(scales), 1, 16, 64, None)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    import sys
    if sys.platform.startswith("linux") and torch._C.has_openmp:  # else at::parallel_for would run serially
        assert qk.config()["threaded"]
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.attnzoo.q_linear(torch.randn(2, 32), codes, scales, 1, 16, 64, None)
    with pytest.raises(RuntimeError, match="codes"):
        torch.ops.attnzoo.q_linear(x, codes[:1], scales, 1, 16, 64, None)


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_gguf_blocks_kept_as_shipped(qt):
    """A GGUF tensor's blocks packed as their own kind: the weight is gguf's dequantisation bit for bit, and
    quant_linear runs the kernel (where built) or the reference, which agree."""
    N, K = 37, 96
    raw = gguf.quants.quantize(np.random.default_rng(4).standard_normal((N, K)).astype(np.float32) * 0.05, qt)
    b = unpack_gguf(raw, qt, (N, K))
    qw = pack(b, q_kind(b))
    assert qw.kind == qt.name.lower() and qw.native == qk.HAVE_KERNEL
    want = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qt), np.float32).reshape(N, K))
    assert torch.equal(dequantize(qw), want)
    x = torch.randn(2, 4, K)
    y = quant_linear(x, qw)
    ref = qk.reference_q_linear(x, qw.packed, qw.scales, qw.kind, N, K)
    assert y.shape == (2, 4, N) and torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    slow = pack(b, q_kind(b), native=False)
    assert torch.equal(quant_linear(x, slow), ref)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_quant_linear_module_in_gguf_kinds(kind):
    """QuantLinear / quantize_model with the GGUF kinds: the module's product is the op's on its own weight,
    .to(bfloat16) leaves the fp16-bit scales alone and computes from bf16 activations, the lm_head defaults
    to q8_0."""
    from torch import nn

    from attnzoo.layers.quant import QuantLinear, quantize_model
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = QuantLinear.from_linear(lin, kind)
    x = torch.randn(3, 96)
    assert q.kind == kind and q.scales.dtype == torch.int16
    want = qk.reference_q_linear(x, q.packed, q.scales, kind, 40, 96, lin.bias.detach())
    assert torch.allclose(q(x), want, rtol=1e-5, atol=1e-5)
    qb = q.to(torch.bfloat16)
    assert qb.scales.dtype == torch.int16 and qb(x.bfloat16()).dtype == torch.bfloat16
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
    model.lm_head = nn.Linear(32, 50)
    assert quantize_model(model, kind) == {"0": kind, "lm_head": "q8_0"}
