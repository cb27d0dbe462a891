"""GGUF blocks as shipped (Q4_0, Q4_1, Q8_0) for the C++ op `attnzoo::q_linear` (attnzoo/csrc, built by
setup.py): the packed layout, a pure-PyTorch reference of exactly what the kernel computes, and the op call.

A weight [N, K] in blocks of 32 inputs: Q4_0 w = (q - 8) d, Q4_1 w = q d + m (q 0..15), Q8_0 w = q d (q int8),
d and m in fp16 (GGUF's own precision, so a file's blocks are kept exactly). `pack_q` repacks them once at load
for the GEMV (attnzoo/csrc/qkernel.h and docs/quantization.md draw the layout): rows in groups of 8, and per
group and block the codes of all 8 rows together, interleaved so that one AVX2 horizontal add leaves the
8 rows' dot products in row order; scales as fp16 bits in int16 (an integer buffer, so a module's
.to(bfloat16) leaves them alone).

What the kernel computes, for each row of x (fp32, or bf16 read as fp32): per block of 32 inputs, dx = amax / 127,
qx = round_half_even(x * (1 / dx)) (int8), sx = dx * sum(qx); then y[n] = sum over blocks of
(dw * dx) * dot(qw, qx) + mw * sx (+ bias), with mw = m (Q4_1), -8 dw (Q4_0) or 0 (Q8_0): llama.cpp's scheme
(activations quantised to 8 bits once per matmul, integer dot products). The dot products are exact, so the
kernel and `reference_q_linear` differ by float rounding of the scale arithmetic only; both differ from
x @ dequantised(w).T by the activations' rounding (at most dx / 2 per input). From `panel_m` rows of x on
(measured, see `config`), the op instead multiplies by dequantised fp32 panels of w (at::mm), that is exactly
x @ dequantised(w).T up to GEMM rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

FMTS = {"q4_0": 0, "q4_1": 1, "q8_0": 2}   # the op's fmt argument
ISAS = ("scalar", "avx2", "avx512", "avx512_vnni")
ROWS, BLOCK = 8, 32
LO, HI = [0, 1, 4, 5], [2, 3, 6, 7]       # rows in the low / high nibbles (Q4) or vectors (Q8) of a chunk

# registers torch.ops.attnzoo.q_linear (setup.py builds it when a compiler is there)
from attnzoo.ops.extension import HAVE_KERNEL, KERNEL_ERROR

if HAVE_KERNEL:
    @torch.library.register_fake("attnzoo::q_linear")
    def _(x: Tensor, codes: Tensor, scales: Tensor, fmt: int, N: int, K: int, bias: Tensor | None = None) -> Tensor:
        torch._check(x.shape[-1] == K)
        return x.new_empty((*x.shape[:-1], N))


def config(isa: str | None = None, panel_m: int | None = None) -> dict[str, str | int]:
    """The kernel's run-time choices: `isa` caps the instruction set (one of ISAS; a cap above what the CPU has
    stays at the CPU's best), `panel_m` sets the rows of x from which the dequantised-panel GEMM runs.
    Returns {"isa": in use, "best": this CPU's best, "panel_m": ..., "threaded": built with OpenMP, so that
    the op splits its rows over torch's threads}."""
    if not HAVE_KERNEL:
        raise RuntimeError(f"attnzoo's C++ kernels are not built ({KERNEL_ERROR})")
    use, best, pm, threaded = torch.ops.attnzoo.q_linear_config(-1 if isa is None else ISAS.index(isa),
                                                                -1 if panel_m is None else panel_m)
    return {"isa": ISAS[use], "best": ISAS[best], "panel_m": pm, "threaded": bool(threaded)}


def _groups(t: Tensor, G: int) -> Tensor:
    """[N, ...] -> [G * ROWS, ...], zero rows appended."""
    return torch.cat([t, t.new_zeros(G * ROWS - t.shape[0], *t.shape[1:])]) if G * ROWS > t.shape[0] else t


def pack_q(q: Tensor, d: Tensor, m: Tensor | None, fmt: str) -> tuple[Tensor, Tensor]:
    """Codes q [N, K] (0..15 for Q4_0/Q4_1, int8 for Q8_0), d and m [N, K / 32] -> (codes uint8
    [G, K / 32, 128 or 256], scales int16 [G, K / 32, 2 (Q4_1) or 1, 8] holding fp16 bits), G = ceil(N / 8).
    d and m are rounded to fp16 (exact for GGUF's own); Q4_0 stores d only (its m is -8 d)."""
    N, K = q.shape
    G, nb = -(-N // ROWS), K // BLOCK
    qg = _groups(q, G).view(G, ROWS, nb, 4, 8)                           # [g, row, block, chunk, input]
    if fmt == "q8_0":
        qg = qg.to(torch.int8)
        halves = [qg[:, rows].permute(0, 2, 3, 1, 4) for rows in (LO, HI)]  # [g, block, chunk, k, input]
        codes = torch.stack(halves, 3).contiguous().view(torch.uint8).view(G, nb, 256)
    else:
        lo, hi = (qg[:, rows].to(torch.uint8).permute(0, 2, 3, 1, 4) for rows in (LO, HI))
        codes = (lo | (hi << 4)).contiguous().view(G, nb, 128)
    parts = [d, m] if fmt == "q4_1" else [d]
    scales = torch.stack([_groups(p.to(torch.float16), G).view(G, ROWS, nb).transpose(1, 2) for p in parts], 2)
    return codes, scales.contiguous().view(torch.int16)


def unpack_q(codes: Tensor, scales: Tensor, fmt: str, N: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inverse of `pack_q`: (q [N, K], d [N, K / 32] fp32, m: Q4_1's, -8 d for Q4_0, None for Q8_0)."""
    G, nb = codes.shape[:2]
    if fmt == "q8_0":
        halves = codes.view(torch.int8).view(G, nb, 4, 2, 4, 8).unbind(3)  # each [g, block, chunk, k, input]
    else:
        c = codes.view(G, nb, 4, 4, 8)
        halves = (c & 15, c >> 4)
    q = torch.empty(G, ROWS, nb, 4, 8, dtype=halves[0].dtype)
    for rows, half in zip((LO, HI), halves):
        q[:, rows] = half.permute(0, 3, 1, 2, 4)
    s = scales.view(torch.float16).float().permute(0, 3, 2, 1).reshape(G * ROWS, -1, nb)[:N]  # [N, S, nb]
    d = s[:, 0]
    m = s[:, 1] if fmt == "q4_1" else -8 * d if fmt == "q4_0" else None
    return q.view(G * ROWS, nb * BLOCK)[:N], d, m


def quantize_q8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] -> (qx int8 [M, K], dx [M, K / 32], sx [M, K / 32]) in fp32, with the kernel's operations and
    rounding: dx = amax / 127, qx = round_half_even(x * (1 / dx)), sx = dx * sum(qx)."""
    M, K = x.shape
    xb = x.float().view(M, K // BLOCK, BLOCK)
    d = xb.abs().amax(-1) / 127
    q = (xb * torch.where(d != 0, 1 / d, torch.zeros_like(d))[..., None]).round()
    return q.to(torch.int8).view(M, K), d, d * q.sum(-1)


def reference_q_linear(x: Tensor, codes: Tensor, scales: Tensor, fmt: str, N: int, K: int,
                       bias: Tensor | None = None) -> Tensor:
    """What the kernel's integer path computes, in PyTorch: x [..., K] -> [..., N] in x's dtype. The dot
    products are exact (float64 sums of integers); the scale arithmetic rounds in its own order."""
    x2 = x.reshape(-1, K)
    M, nb = x2.shape[0], K // BLOCK
    qx, dx, sx = quantize_q8(x2)
    qw, dw, mw = unpack_q(codes, scales, fmt, N)
    dots = torch.bmm(qx.view(M, nb, BLOCK).transpose(0, 1).double(),
                     qw.view(N, nb, BLOCK).permute(1, 2, 0).double()).permute(1, 2, 0).float()  # [M, N, nb]
    y = (dw * dx[:, None] * dots).sum(-1)
    if mw is not None:
        y = y + sx @ mw.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], N)


def q_linear(x: Tensor, codes: Tensor, scales: Tensor, fmt: str, N: int, K: int, bias: Tensor | None = None,
             kernel: bool = True) -> Tensor:
    """x [..., K] (fp32 or bf16) -> x @ w.T (+ bias) [..., N] in x's dtype: the C++ op where it is built
    (and `kernel`), else `reference_q_linear`."""
    if kernel and HAVE_KERNEL:
        return torch.ops.attnzoo.q_linear(x, codes, scales, FMTS[fmt], N, K, bias)
    return reference_q_linear(x, codes, scales, fmt, N, K, bias)
