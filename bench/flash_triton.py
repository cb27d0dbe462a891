"""GPU benchmark and compiled-mode check of the Triton kernels (needs CUDA).

    python bench/flash_triton.py

Flash attention forward and forward+backward vs PyTorch SDPA (bf16, causal, GQA), a torch.compile
(inductor) run through the custom op, and paged flash-decoding vs the torch gather path. Every row is
checked against SDPA / the torch path before its time is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnzoo.ops.attention.paged import paged_attention  # noqa: E402
from attnzoo.ops.attention.triton import attention_triton, paged_decode_triton  # noqa: E402


def flash(B: int, T: int, H: int, Hkv: int, d: int) -> None:
    q = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, Hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)

    def ours() -> torch.Tensor:
        return attention_triton(q, k, v, causal=True)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                              enable_gqa=True).transpose(1, 2)

    err = (ours().float() - sdpa().float()).abs().max().item()
    g1 = torch.autograd.grad(ours(), (q, k, v), do)
    g2 = torch.autograd.grad(sdpa(), (q, k, v), do)
    gerr = max((a.float() - b.float()).abs().max().item() for a, b in zip(g1, g2))
    flops = 4 * B * H * T * T * d / 2  # causal: half the square
    row = f"B{B} T{T} H{H}:{Hkv} d{d} bf16 causal  max|out-sdpa| {err:.3g}  max|grad-sdpa| {gerr:.3g}"
    for name, fn in (("triton", ours), ("sdpa", sdpa)):
        f = do_bench(fn)
        fb = do_bench(lambda: torch.autograd.grad(fn(), (q, k, v), do))
        row += f"\n   {name:6s} fwd {f:7.3f} ms ({flops / f / 1e9:6.1f} TFLOP/s)  fwd+bwd {fb:7.3f} ms " \
               f"({3.5 * flops / fb / 1e9:6.1f} TFLOP/s)"
    print(row, flush=True)


def compiled() -> None:
    q, k, v = (torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    q.requires_grad_()
    fn = torch.compile(lambda a, b, c: attention_triton(a, b, c, causal=True).float().square().sum(), fullgraph=True)
    loss = fn(q, k, v)
    loss.backward()
    ref = attention_triton(q, k, v, causal=True).float().square().sum()
    print(f"torch.compile(inductor, fullgraph) loss {loss.item():.4f} eager {ref.item():.4f} "
          f"grad finite {bool(q.grad.isfinite().all())}", flush=True)


def decode(B: int, L: int, H: int, Hkv: int, d: int, page: int = 16) -> None:
    n = -(-L // page)
    P = B * n
    kc = torch.randn(Hkv, P, page, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(Hkv, P, page, d, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(P, dtype=torch.int32).view(B, n)
    lens = torch.full((B,), L, dtype=torch.int32)
    q = torch.randn(B, H, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(B + 1, dtype=torch.int32)
    ours = paged_decode_triton(q, kc, vc, table.cuda(), lens.cuda())
    # the torch gather path (what paged_attention does on CPU), run on the GPU for comparison
    from attnzoo.ops.attention.paged import paged_attention_planned, plan_paged

    plan = plan_paged(table, cu, lens, page)
    plan.decode_block_table = None  # force the gather path
    plan.decode_pages, plan.decode_valid = plan.decode_pages.cuda(), plan.decode_valid.cuda()
    ref = paged_attention_planned(q, kc, vc, plan)
    err = (ours.float() - ref.float()).abs().max().item()
    t1 = do_bench(lambda: paged_decode_triton(q, kc, vc, table.cuda(), lens.cuda()))
    t2 = do_bench(lambda: paged_attention_planned(q, kc, vc, plan))
    gb = 2 * Hkv * B * L * d * 2 / 1e9
    print(f"decode B{B} L{L} H{H}:{Hkv} d{d} bf16  max|diff| {err:.3g}  triton {t1 * 1e3:7.1f} us "
          f"({gb / t1 * 1e3:6.0f} GB/s)  torch gather {t2 * 1e3:7.1f} us", flush=True)
    assert paged_attention is not None


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    compiled()
    for shape in ((4, 2048, 32, 8, 128), (2, 4096, 16, 16, 64), (1, 2048, 8, 8, 256)):
        flash(*shape)
    for shape in ((8, 4096, 32, 8, 128), (64, 1024, 32, 8, 128), (1, 32768, 32, 8, 128)):
        decode(*shape)
