"""Weight-only quantised matmuls on the CPU: int4 (grouped, asymmetric) and int8 (per output channel) through
torch's kernels, and GGUF's Q4_0/Q4_1/Q8_0 blocks as shipped through our C++ kernel (ops/quant_kernels.py).

Two forms of a quantised weight [N, K] (N output rows, K input features):

- `Blocks`, the unpacked form a loader edits: integer codes q [N, K] with a scale d and offset m per group
  of `group_size` consecutive inputs of a row, w = q * d + m. GGUF's Q4_0, Q4_1 and Q8_0 unpack to it
  exactly, and since every field has the rows first, fusing (row concatenation) and llama.cpp's Q/K head
  permutation (a row permutation) apply to it as to the float weight, before packing once.
- `QuantWeight`, the packed form `quant_linear` multiplies with, through torch's CPU kernels:
  int4: `torch._weight_int4pack_mm_for_cpu`, which computes w = (q - 8) * scale + zero per group
  (group 32..256, N a multiple of 16); int8: `torch._weight_int8pack_mm`, w = q * scale[n] (one scale per
  output row only). The kernels want the scales in the activations' dtype, so a QuantWeight is packed for
  one compute dtype (fp32 or bf16) and other activations are cast to it.

GGUF Q4_1 (w = q d + m) is int4 with scale d and zero m + 8 d, Q4_0 (w = (q - 8) d) with zero 0: both exact
in fp32 activations. Q8_0 has a scale per 32 inputs, which the int8 kernel cannot hold: `pack` requantises
it to one scale per row (max |w| / 127; exact where a row's blocks share a scale; measured error on real
weights in bench/quant_cpu.py), the choice that keeps 8-bit codes at the int8 kernel's speed.

The kinds "q4_0", "q4_1", "q8_0" keep GGUF's blocks of 32 exactly (fp16 d, and m for Q4_1) for
`attnzoo::q_linear` (ops/quant_kernels.py: activations quantised to 8 bits per 32-block, integer dot products),
which computes in fp32 whatever the activations' dtype (`load_model(quantization="gguf")` uses them). Where the
extension is not built (`HAVE_KERNEL`), they run its PyTorch reference: same results, slowly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

# HAVE_KERNEL / KERNEL_ERROR: whether attnzoo._C is built, and why not
from attnzoo.ops.quant_kernels import HAVE_KERNEL, KERNEL_ERROR, pack_q, q_linear, unpack_q  # noqa: F401

Kind = Literal["int4", "int8", "q4_0", "q4_1", "q8_0"]
Q_KINDS = ("q4_0", "q4_1", "q8_0")   # GGUF blocks of 32 for attnzoo::q_linear
INT4_GROUPS = (32, 64, 128, 256)  # group sizes the int4 kernel accepts
INT4_ROWS = 16                    # the int4 packer needs N divisible by this
HAVE_INT4 = (hasattr(torch, "_weight_int4pack_mm_for_cpu")
             and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))
HAVE_INT8 = hasattr(torch, "_weight_int8pack_mm")


@dataclass
class Blocks:
    """w[n, k] = q[n, k] * d[n, k // group_size] + m[n, k // group_size] (m None: 0). q is uint8 0..15 for
    4 bits, int8 for 8 bits; d and m are fp32."""
    q: Tensor
    d: Tensor
    m: Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> Tensor:
        d = self.d.repeat_interleave(self.group_size, dim=1)
        w = self.q.float() * d
        return w if self.m is None else w + self.m.repeat_interleave(self.group_size, dim=1)

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> Blocks:
        """Apply a row reordering (e.g. llama.cpp's Q/K unpermute) to q, d and m alike. fn must move whole
        rows only (it sees [N, K] and [N, K / group_size] tensors)."""
        return replace(self, q=fn(self.q), d=fn(self.d), m=None if self.m is None else fn(self.m))

    def rows(self, index: Tensor) -> Blocks:
        return self.map_rows(lambda a: a[index])


def cat_rows(parts: Sequence[Blocks]) -> Blocks:
    """Row concatenation (fused qkv_proj, gate_up_proj) of blocks with the same bits and group size."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(p.bits != first.bits or p.group_size != first.group_size or p.shape[1] != first.shape[1] for p in parts):
        raise ValueError("cat_rows needs the same bits, group size and K in every part")
    if any(p.m is None for p in parts) and not all(p.m is None for p in parts):
        parts = [p if p.m is not None else replace(p, m=torch.zeros_like(p.d)) for p in parts]
    return Blocks(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]),
                  None if parts[0].m is None else torch.cat([p.m for p in parts]), first.bits, first.group_size)


GGUF_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


def unpack_gguf(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> Blocks:
    """Raw GGUF bytes of a [N, K] tensor (e.g. GGUFReader's tensor.data; shape in torch order, rows first)
    -> Blocks. Q4_0 block: fp16 d, 16 bytes of nibbles (element j in the low nibble of byte j, element
    j + 16 in its high nibble), w = (q - 8) d. Q4_1: fp16 d, fp16 m, nibbles, w = q d + m. Q8_0: fp16 d,
    32 int8, w = q d."""
    if qtype not in GGUF_TYPES:
        raise ValueError(f"unpack_gguf handles {', '.join(t.name for t in GGUF_TYPES)}, not {qtype.name}")
    N, K = shape
    bs, ts = GGML_QUANT_SIZES[qtype]
    if K % bs:
        raise ValueError(f"K = {K} is not a multiple of the {qtype.name} block size {bs}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(N * (K // bs), ts)
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16)).float().view(N, K // bs)
    if qtype == GGMLQuantizationType.Q8_0:
        q = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).view(N, K)
        return Blocks(q, d, None, 8, bs)
    start = 4 if qtype == GGMLQuantizationType.Q4_1 else 2
    qs = torch.from_numpy(blocks[:, start:].copy())  # [B, 16]
    q = torch.cat([qs & 15, qs >> 4], dim=1).view(N, K)
    if qtype == GGMLQuantizationType.Q4_1:
        m = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16)).float().view(N, K // bs)
    else:
        m = -8 * d  # exact (a power of two), and q d - 8 d rounds like gguf's (q - 8) d: both exact in fp32
    return Blocks(q, d, m, 4, bs)


@dataclass
class QuantWeight:
    """Packed weight for `quant_linear`. int4: packed is torch's CPU int4 layout ([N, K/2] uint8, opaque) when
    `native`, else plain nibbles (byte [n, j] = q[n, 2j] | q[n, 2j+1] << 4); scales is scale_and_zeros
    [K / group_size, N, 2] with w = (q - 8) * scale + zero. int8: packed is q [N, K] int8, scales [N],
    w = q * scale, group_size = K. The scales' dtype is the compute dtype. q4_0/q4_1/q8_0: packed and scales as
    ops/quant_kernels.pack_q lays them out (scales: fp16 bits in int16), group_size 32; native: the C++ op runs
    (else its PyTorch reference); the compute dtype is fp32."""
    kind: Kind
    packed: Tensor
    scales: Tensor
    group_size: int
    N: int
    K: int
    native: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.kind in Q_KINDS else self.scales.dtype


def fit_int4(w: Tensor, group_size: int) -> Blocks:
    """Asymmetric 4-bit codes per group: d = (max - min) / 15, m = min, q = round((w - m) / d)."""
    N, K = w.shape
    g = w.float().view(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((g - lo[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
    return Blocks(q, d, lo, 4, group_size)


def fit_int8(w: Tensor) -> Blocks:
    """Symmetric 8-bit codes per row: d = max |w| / 127, q = round(w / d)."""
    w = w.float()
    d = w.abs().amax(1, keepdim=True) / 127
    q = (w / torch.where(d > 0, d, torch.ones_like(d))).round().clamp(-127, 127).to(torch.int8)
    return Blocks(q, d, None, 8, w.shape[1])


def fit_q8_0(w: Tensor) -> Blocks:
    """GGUF Q8_0 of a float weight: per block of 32, d = fp16(max |w| / 127), q = round(w / d)."""
    N, K = w.shape
    g = w.float().view(N, K // 32, 32)
    d = (g.abs().amax(-1) / 127).half().float()
    q = (g / torch.where(d > 0, d, torch.ones_like(d))[..., None]).round().clamp(-127, 127).to(torch.int8)
    return Blocks(q.view(N, K), d, None, 8, 32)


def q_kind(b: Blocks) -> Kind:
    """The GGUF block kind that holds b exactly: q8_0 for 8-bit codes with no offset, q4_0 where m = -8 d
    (what `unpack_gguf` gives for Q4_0), else q4_1; blocks of other sizes are refit by `pack`."""
    if b.bits == 8:
        return "q8_0"
    return "q4_0" if b.m is not None and torch.equal(b.m, -8 * b.d) else "q4_1"


def _pack_q(b: Blocks, kind: Kind, native: bool | None) -> QuantWeight:
    """Blocks -> a q kind: kept exactly when they are that kind (up to fp16 scales), else refit from the
    dequantised weight (q4_1 asymmetric, q8_0 symmetric; q4_0 holds GGUF's own Q4_0 blocks only)."""
    N, K = b.shape
    if K % 32:
        raise ValueError(f"{kind} needs K divisible by 32, got {K}")
    if b.group_size != 32 or (kind == "q8_0") != (b.bits == 8) or (b.bits == 8 and b.m is not None):
        if kind == "q4_0":
            raise ValueError("q4_0 holds GGUF Q4_0 blocks (w = (q - 8) d); quantise other weights to q4_1")
        b = fit_int4(b.dequantize(), 32) if kind == "q4_1" else fit_q8_0(b.dequantize())
    if kind == "q4_0" and q_kind(b) != "q4_0":
        raise ValueError("these blocks are not Q4_0 (m != -8 d): pack them as q4_1")
    m = (b.m if b.m is not None else torch.zeros_like(b.d)) if kind == "q4_1" else None
    codes, scales = pack_q(b.q, b.d, m, kind)
    return QuantWeight(kind, codes, scales, 32, N, K, HAVE_KERNEL if native is None else native)


def _int4_order(N: int, K: int) -> Tensor:
    """Where torch's int4 packer puts each code: for nibble i of the packed bytes (2 * byte + 0 low, 1 high),
    the flat index n * K + k it came from. Found by packing the index's digits, so it follows whatever layout
    this torch uses (it is a value-independent reordering)."""
    idx = torch.arange(N * K, dtype=torch.int64).view(N, K)
    src = torch.zeros(N * K, dtype=torch.int64)
    for shift in range(0, max(1, (N * K - 1).bit_length()), 4):
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((idx >> shift) & 15).to(torch.int32), 1)
        src |= torch.stack([p & 15, p >> 4], -1).flatten().to(torch.int64) << shift
    return src


def _int4_codes(qw: QuantWeight) -> Tensor:
    p = qw.packed.to(torch.int64)
    nib = torch.stack([p & 15, p >> 4], -1).flatten()
    if not qw.native:
        return nib.view(qw.N, qw.K)
    q = torch.empty(qw.N * qw.K, dtype=torch.int64)
    q[_int4_order(qw.N, qw.K)] = nib
    return q.view(qw.N, qw.K)


def pack(b: Blocks, kind: Kind | None = None, dtype: torch.dtype = torch.float32,
         native: bool | None = None) -> QuantWeight:
    """Blocks -> QuantWeight for compute in `dtype` (torch kinds; q kinds compute in fp32). kind defaults to
    the blocks' own bits (int4/int8); asking for another requantises from the dequantised weight, as does int8
    from blocks with more than one group per row (GGUF Q8_0). native=False (or the kernel missing) keeps a
    plain layout that `quant_linear` multiplies by dequantising (slow; the fallback); for q kinds it runs
    the C++ op's PyTorch reference."""
    kind = kind or ("int4" if b.bits == 4 else "int8")
    if kind in Q_KINDS:
        return _pack_q(b, kind, native)
    N, K = b.shape
    if kind == "int8":
        if b.group_size != K or b.m is not None or b.bits != 8:
            b = fit_int8(b.dequantize())
        return QuantWeight("int8", b.q.contiguous(), b.d[:, 0].to(dtype).contiguous(), K, N, K,
                           HAVE_INT8 if native is None else native)
    if b.bits != 4:
        b = fit_int4(b.dequantize(), b.group_size if b.group_size in INT4_GROUPS else 32)
    if b.group_size not in INT4_GROUPS or K % b.group_size:
        raise ValueError(f"int4 needs a group size in {INT4_GROUPS} dividing K = {K}, got {b.group_size}")
    native = HAVE_INT4 if native is None else native
    if native and N % INT4_ROWS:
        raise ValueError(f"the int4 kernel needs N divisible by {INT4_ROWS}, got {N}")
    zero = 8 * b.d if b.m is None else b.m + 8 * b.d  # w = q d + m = (q - 8) d + (m + 8 d)
    scales = torch.stack([b.d.t(), zero.t()], -1).to(dtype).contiguous()
    q = b.q.to(torch.int32)
    if native:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    else:
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return QuantWeight("int4", packed, scales, b.group_size, N, K, native)


def quantize_int4(w: Tensor, group_size: int = 32, dtype: torch.dtype | None = None) -> QuantWeight:
    """Float weight [N, K] -> int4, asymmetric per group of `group_size` inputs; |error| <= (max - min) / 30
    of the group (plus the rounding of the scales to `dtype`, default the weight's dtype)."""
    if group_size not in INT4_GROUPS or w.shape[1] % group_size:
        raise ValueError(f"int4 needs a group size in {INT4_GROUPS} dividing K = {w.shape[1]}, got {group_size}")
    return pack(fit_int4(w, group_size), "int4", dtype or w.dtype)


def quantize_int8(w: Tensor, dtype: torch.dtype | None = None) -> QuantWeight:
    """Float weight [N, K] -> int8, symmetric per output row; |error| <= max |w_row| / 254."""
    return pack(fit_int8(w), "int8", dtype or w.dtype)


def dequantize(qw: QuantWeight) -> Tensor:
    """The reference: the fp32 weight [N, K] the packed form stands for (scales as stored, in their dtype)."""
    if qw.kind in Q_KINDS:
        q, d, m = unpack_q(qw.packed, qw.scales, qw.kind, qw.N)
        return Blocks(q, d, m, 8 if qw.kind == "q8_0" else 4, 32).dequantize()
    if qw.kind == "int8":
        return qw.packed.float() * qw.scales.float()[:, None]
    s = qw.scales.float()
    scale = s[..., 0].t().repeat_interleave(qw.group_size, dim=1)
    zero = s[..., 1].t().repeat_interleave(qw.group_size, dim=1)
    return (_int4_codes(qw) - 8).float() * scale + zero


def quant_linear(x: Tensor, qw: QuantWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] -> x @ w.T (+ bias) [..., N] in x's dtype, computed in the weight's dtype."""
    if x.shape[-1] != qw.K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {qw.K}")
    if qw.kind in Q_KINDS:  # fp32 or bf16 activations as they are; other dtypes computed in fp32
        xq = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        return q_linear(xq, qw.packed, qw.scales, qw.kind, qw.N, qw.K, bias, qw.native).to(x.dtype)
    flat = x.dim() == 2 and x.dtype == qw.dtype and x.is_contiguous()   # the decode case: no copies, no casts
    x2 = x if flat else x.reshape(-1, qw.K).to(qw.dtype).contiguous()
    if not qw.native:
        y = F.linear(x2, dequantize(qw).to(qw.dtype))
    elif qw.kind == "int4":
        y = torch._weight_int4pack_mm_for_cpu(x2, qw.packed, qw.group_size, qw.scales)
    else:
        y = torch._weight_int8pack_mm(x2, qw.packed, qw.scales)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if flat else y.to(x.dtype).view(*x.shape[:-1], qw.N)
