"""CPU benchmark: attnzoo's fast attention vs torch SDPA vs the naive reference.

    python bench/attention_cpu.py [--quick]

Causal GQA 9:3, head dim 64, batch 1, fp32, 2 threads. Prefill rows (Tq == Tk) and decode
rows (Tq == 1). Every row is checked for correctness before it is timed; a row whose check
fails prints FAILED instead of a speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402  (common.py also puts the checkout on sys.path)

from attnzoo.ops.attention import attention, attention_reference  # noqa: E402

H, HKV, D = 9, 3, 64
REF_MEM_LIMIT = 2e9  # bytes; the reference holds ~4 fp32 [H, Tq, Tk] matrices at once
ATOL = 1e-4  # fp32 vs fp32 reference; real bugs are O(0.1)
SPOT_ROWS = 256  # when the full reference is too big, check the last rows (they need all keys)


def median_ms(fn: Callable[[], object], budget_s: float = 2.0) -> float:
    fn()  # warm-up (also allocator / thread pool)
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    n = max(3, min(25, int(budget_s / max(once, 1e-6))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def ref_bytes(tq: int, tk: int) -> float:
    return 4.0 * H * tq * tk * 4


def check(out: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(out.isfinite().all()) and (out - want).abs().max().item() <= ATOL


def bench_row(name: str, tq: int, tk: int, flops: float, with_ref: bool) -> str:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, tq, H, D, generator=g)
    k = torch.randn(1, tk, HKV, D, generator=g)
    v = torch.randn(1, tk, HKV, D, generator=g)
    causal = tq > 1  # decode: the one query sees every key either way

    def ours() -> torch.Tensor:
        return attention(q, k, v, causal=True, backend="torch")

    def sdpa() -> torch.Tensor:
        # SDPA's is_causal is top-left aligned: only correct for Tq == Tk, so off for decode.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal, enable_gqa=True)
        return o.transpose(1, 2)

    def ref() -> torch.Tensor:
        return attention_reference(q, k, v, causal=True)

    full_ref = ref_bytes(tq, tk) <= REF_MEM_LIMIT
    with torch.inference_mode():
        o_ours, o_sdpa = ours(), sdpa()
        if full_ref:
            want, how = ref(), "reference"
            ok_ours, ok_sdpa = check(o_ours, want), check(o_sdpa, want)
        else:  # bottom-right causal: the last rows of q against all keys are the same rows
            n = min(SPOT_ROWS, tq)
            want, how = attention_reference(q[:, -n:], k, v, causal=True), f"reference (last {n} rows) + each other"
            ok_ours = check(o_ours[:, -n:], want) and check(o_ours, o_sdpa)
            ok_sdpa = check(o_sdpa[:, -n:], want)
        del o_ours, o_sdpa, want

        def cell(ok: bool, fn: Callable[[], object]) -> tuple[str, float | None]:
            if not ok:
                return "FAILED", None
            ms = median_ms(fn)
            return f"{ms:.3f} ms / {flops / ms / 1e6:.1f} GFLOP/s", ms

        c_ours, t_ours = cell(ok_ours, ours)
        c_sdpa, t_sdpa = cell(ok_sdpa, sdpa)
        if with_ref and full_ref:
            c_ref, _ = cell(True, ref)
        elif with_ref:
            c_ref = f"skipped (O(T^2) memory: {ref_bytes(tq, tk) / 1e9:.1f} GB)"
        else:
            c_ref = "-"
    speed = f"{t_sdpa / t_ours:.2f}x" if t_ours and t_sdpa else "-"
    return f"| {name} | {c_ours} | {c_sdpa} | {c_ref} | {speed} | {how} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds (smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.pop("ATTNZOO_BACKEND", None)  # the dispatcher is pinned via backend= anyway

    sizes = [64, 200] if args.quick else [512, 2048, 8192]
    print(f"# attention CPU benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"- causal, GQA {H}:{HKV}, head dim {D}, batch 1, fp32; median of several runs after warm-up")
    print("- GFLOP/s counts 4*Tq*Tk*d*H (halved for causal prefill)\n")
    print("| case | ours (dispatcher, torch) | SDPA direct | reference | ours vs SDPA | checked against |")
    print("|---|---|---|---|---|---|")
    for t in sizes:
        print(bench_row(f"prefill T={t}", t, t, 4 * t * t * D * H / 2, with_ref=True), flush=True)
    for t in sizes:
        print(bench_row(f"decode Tq=1, Tk={t}", 1, t, 4 * t * D * H, with_ref=True), flush=True)


if __name__ == "__main__":
    main()
