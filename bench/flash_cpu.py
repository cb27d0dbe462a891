"""CPU benchmark: blockwise O(T)-memory attention vs the naive reference vs SDPA (math), training.

    python bench/flash_cpu.py [--quick]

Causal GQA 9:3, head dim 64, batch 1, fp32, forward + backward (autograd). Each case runs
in its own subprocess so its peak memory is its own: peak = VmHWM - VmRSS around the
forward+backward (VmHWM reset through /proc/self/clear_refs; getrusage's ru_maxrss is
inherited across fork + exec, so a child of a big parent would report the parent's peak).
Every row is checked before its numbers are printed (full reference where it fits, else
the last rows, which see every key); a failed check prints FAILED.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402  (common.py also puts the checkout on sys.path)

from attnzoo.ops.attention import attention_reference  # noqa: E402
from attnzoo.ops.attention.blockwise import attention_blockwise  # noqa: E402

H, HKV, D = 9, 3, 64
MEM_LIMIT = 8e9  # bytes: the naive paths are skipped above this estimate
# Peak bytes per H*T^2 element for forward+backward, measured here at T=1k/4k: the reference
# ~6.2 fp32 [H, T, T] matrices (scores, mask, exp, P kept for autograd), SDPA math ~3.1.
NAIVE_FACTOR = {"reference": 4 * 6.5, "sdpa_math": 4 * 3.5}
ATOL = 2e-4  # fp32 vs fp32 reference; real bugs are O(0.1)
CHECK_ROWS = 256  # big T: check the last rows against the reference on those rows only


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _run(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if impl == "blockwise":
        return attention_blockwise(q, k, v, causal=True)
    if impl == "reference":
        return attention_reference(q, k, v, causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)  # Tq == Tk: top-left == ours
    return o.transpose(1, 2)


def case(impl: str, T: int, full_check: bool) -> dict:
    """One forward+backward in this process: time, peak memory, check. Returns a JSON-able dict."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, T, h, D, generator=g, requires_grad=True) for h in (H, HKV, HKV))
    w = torch.randn(1, T, H, D, generator=g)
    small = [t[:, :64].detach().requires_grad_() for t in (q, k, v)]  # warm-up: threads, allocator
    _run(impl, *small).backward(w[:, :64])
    _reset_peak()
    before = _status("VmRSS")
    fwd, bwd = [], []
    for i in range(3 if T <= 4096 else 1):  # first run: peak memory; repeats (small T): min time
        for t in (q, k, v):
            t.grad = None
        t0 = time.perf_counter()
        out = _run(impl, q, k, v)
        t1 = time.perf_counter()
        out.backward(w)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        if i == 0:
            peak = _status("VmHWM") - before
    grads = [t.grad for t in (q, k, v)]
    ok = bool(out.isfinite().all()) and all(gr is not None and bool(gr.isfinite().all()) for gr in grads)
    if ok and full_check:
        qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
        ref = attention_reference(qr, kr, vr, causal=True)
        ref.backward(w)
        ok = all((a - b).abs().max().item() <= ATOL
                 for a, b in zip([out, *grads], [ref, qr.grad, kr.grad, vr.grad]))
    elif ok:  # bottom-right causal: the last rows' reference needs only those queries
        n = min(CHECK_ROWS, T)
        ref = attention_reference(q.detach()[:, -n:], k.detach(), v.detach(), causal=True)
        ok = (out.detach()[:, -n:] - ref).abs().max().item() <= ATOL
    return {"ok": ok, "fwd_s": min(fwd), "bwd_s": min(bwd), "peak": peak}


def spawn(impl: str, T: int, full_check: bool) -> dict:
    cmd = [sys.executable, __file__, "--case", impl, str(T), str(int(full_check))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        return {"ok": False, "error": r.stderr.strip().splitlines()[-1:] or ["exit %d" % r.returncode]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--case", nargs=3, metavar=("IMPL", "T", "FULL_CHECK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        impl, T, full = args.case
        print(json.dumps(case(impl, int(T), full == "1")))
        return 0

    sizes, long_t = ([128, 256], 512) if args.quick else ([1024, 4096, 16384], 32768)
    print(f"machine: {machine()}")
    print(f"causal attention training step (forward + backward), batch 1, H={H}/Hkv={HKV}, d={D}, fp32\n")
    print("| T | impl | forward s | backward s | peak extra MB | T^2 matrix MB (H x T x T fp32) | check |")
    print("|---|---|---|---|---|---|---|")
    rows = [(T, impl) for T in sizes for impl in ("blockwise", "sdpa_math", "reference")] + [(long_t, "blockwise")]
    for T, impl in rows:
        t2_mb = H * T * T * 4 / 1e6
        if impl != "blockwise" and NAIVE_FACTOR[impl] * H * T * T > MEM_LIMIT:
            est = NAIVE_FACTOR[impl] * H * T * T / 1e9
            print(f"| {T} | {impl} | skipped (O(T^2): {est:.0f} GB) | | | {t2_mb:.0f} | |", flush=True)
            continue
        full = NAIVE_FACTOR["reference"] * H * T * T <= MEM_LIMIT  # the reference check itself must fit
        r = spawn(impl, T, full)
        how = "reference" if full else f"last {min(CHECK_ROWS, T)} rows"
        if not r["ok"]:
            print(f"| {T} | {impl} | FAILED | | | {t2_mb:.0f} | {how} {r.get('error', '')} |", flush=True)
            continue
        print(f"| {T} | {impl} | {r['fwd_s']:.3f} | {r['bwd_s']:.3f} | {r['peak'] / 1e6:.0f} | {t2_mb:.0f} "
              f"| ok vs {how} |", flush=True)
    print(f"\nlast row: a {long_t}-token causal sequence, one attention training step (forward + backward).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
