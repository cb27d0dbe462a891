"""Gated delta rule (GDN, KDA) on the CPU: chunked vs recurrent vs the reference, and decode cost per token.

    python bench/delta_rule.py [--quick] [--threads N] [--fla-path DIR] [--out FILE]

(a) Prefill of one layer, batch 1, fp32, forward in inference mode, q/k l2-normalised beforehand (for
    every impl alike), T = 1k, 8k, 32k:
    - GDN at Qwen3-Next's shapes: Hk 16, Hv 32, dk = dv 128, g one per head;
    - KDA at Kimi Linear's: H 32, d 128, g one per key channel.
    Rows: chunk_delta_rule (C = 64, the default, and 16), fused_recurrent_delta_rule (token loop over all
    heads at once),
    delta_rule_reference (smallest T only), and the peer, fla-core's naive PyTorch forms
    (fla.ops.gated_delta_rule.naive / fla.ops.kda.naive) when --fla-path (or env FLA_PATH) holds fla-core;
    fla's GDN forms need equal heads, so they get q/k repeated to Hv before the clock starts.
    Each case runs in its own subprocess, so its memory is its own: peak = VmHWM - VmRSS around the call
    (VmHWM reset through /proc/self/clear_refs): resident memory the op needed beyond its inputs.
    Correctness first: every impl is checked against the float64 reference at T = 200 (256 for fla's
    naive_chunk_kda, which needs whole chunks) before anything is timed, and each timed row is compared
    with the recurrent row of the same T (last 64 outputs and the final state); FAILED otherwise.
(b) Decode, one token: delta_rule_step on a [1, 32, 128, 128] fp32 state (2 MiB whatever the context) vs
    one-query softmax attention over a KV cache of L tokens at a comparable width (16 query heads x 128,
    4 KV heads; attnzoo.ops.attention, torch backend), L = 1k, 8k, 32k.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402  (common.py also puts the checkout on sys.path)

from attnzoo.ops.attention import attention  # noqa: E402
from attnzoo.ops.delta_rule import (chunk_delta_rule, delta_rule_reference, delta_rule_step,  # noqa: E402
                                    fused_recurrent_delta_rule, l2norm)

# (Hk, Hv, d) per gate; --quick scales them down
SHAPES = {"gdn": (16, 32, 128), "kda": (32, 32, 128)}
QUICK_SHAPES = {"gdn": (2, 4, 32), "kda": (4, 4, 32)}
IMPLS = ["recurrent", "chunk", "chunk16", "reference", "fla_chunk", "fla_recurrent"]
SLOW = ("reference", "fla_chunk", "fla_recurrent")  # timed once, and not at the largest T (reference: smallest only)
LABEL = {"recurrent": "fused_recurrent_delta_rule", "chunk": "chunk_delta_rule (C=64)",
         "chunk16": "chunk_delta_rule (C=16)",
         "reference": "delta_rule_reference (token loop)", "fla_chunk": "fla naive chunk",
         "fla_recurrent": "fla naive recurrent"}
FLA_MISSING = "fla: not installed (pip install --no-deps --target DIR fla-core einops; pass --fla-path DIR)"
CHECK_TOL = 1e-4   # max abs diff vs float64 (T = 200); fp32 ops on l2-normalised inputs land near 1e-6
CROSS_TOL = 1e-3   # timed rows vs the recurrent row (fp32 both, up to 32k tokens)


def inputs(gate: str, T: int, quick: bool, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    Hk, Hv, d = (QUICK_SHAPES if quick else SHAPES)[gate]
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k = l2norm(r(1, T, Hk, d)), l2norm(r(1, T, Hk, d))
    g = -F.softplus(r(1, T, Hv, d) if gate == "kda" else r(1, T, Hv))
    return tuple(t.to(dtype) for t in (q, k, r(1, T, Hv, d), g, torch.sigmoid(r(1, T, Hv))))


def load_fla(path: str | None):
    """fla's naive module pair, importing fla only here (after everything else) and only from `path`."""
    if not path or not (Path(path) / "fla").is_dir():
        return None
    sys.path.insert(0, path)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fla.ops.gated_delta_rule import naive as gdn
        from fla.ops.kda import naive as kda
    return gdn, kda


def impl_fn(impl: str, gate: str, args: tuple[torch.Tensor, ...], fla):
    """A no-argument callable returning (o, final_state)."""
    q, k, v, g, beta = args
    if impl == "chunk":
        return lambda: chunk_delta_rule(q, k, v, g, beta)
    if impl == "chunk16":
        return lambda: chunk_delta_rule(q, k, v, g, beta, chunk_size=16)
    if impl == "recurrent":
        return lambda: fused_recurrent_delta_rule(q, k, v, g, beta)
    if impl == "reference":
        return lambda: delta_rule_reference(q, k, v, g, beta)
    gdn, kda = fla
    r = v.shape[2] // q.shape[2]
    qr, kr = q.repeat_interleave(r, 2), k.repeat_interleave(r, 2)  # fla's GDN naive forms: equal heads
    if gate == "gdn":
        if impl == "fla_chunk":
            return lambda: gdn.naive_chunk_gated_delta_rule(qr, kr, v, g, beta, chunk_size=64, output_final_state=True)
        return lambda: gdn.naive_recurrent_gated_delta_rule(qr, kr, v, beta, g, output_final_state=True)
    if impl == "fla_chunk":
        return lambda: kda.naive_chunk_kda(qr, kr, v, g, beta, output_final_state=True, chunk_size=64)
    return lambda: kda.naive_recurrent_kda(qr, kr, v, g, beta, output_final_state=True)


def max_run_len(impl: str, sizes: list[int]) -> int:
    """Largest T an impl is timed at; beyond it the row says skipped (too slow)."""
    if impl == "reference":
        return sizes[0]
    if impl in ("fla_chunk", "fla_recurrent"):
        return sizes[1]
    return sizes[-1]


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def case(gate: str, impl: str, T: int, quick: bool, fla_path: str | None, save: str) -> dict:
    """One timed call in this process: seconds, peak extra bytes; saves (last outputs, final state)."""
    fla = load_fla(fla_path) if impl.startswith("fla") else None
    with torch.inference_mode():
        warm = impl_fn(impl, gate, inputs(gate, min(T, 128), quick, seed=1), fla)
        warm()  # threads, allocator, lazy imports
        fn = impl_fn(impl, gate, inputs(gate, T, quick), fla)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _status("VmRSS")
        times = []
        for i in range(1 if impl in SLOW else 3 if T <= 1024 else 2 if T <= 8192 else 1):
            t0 = time.perf_counter()
            o, s = fn()
            times.append(time.perf_counter() - t0)
            if i == 0:
                peak = _status("VmHWM") - before
        torch.save({"o": o[:, -64:].float().clone(), "s": s.float().clone()}, save)
    return {"s": min(times), "peak": peak}


def spawn(gate: str, impl: str, T: int, quick: bool, fla_path: str | None, threads: int, save: str) -> dict:
    cmd = [sys.executable, __file__, "--case", gate, impl, str(T), "--save", save, "--threads", str(threads)]
    cmd += ["--quick"] if quick else []
    cmd += ["--fla-path", fla_path] if fla_path else []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_all(gates: list[str], impls: list[str], quick: bool, fla) -> dict[tuple[str, str], float]:
    """Max abs difference of each impl vs the float64 reference (outputs and final state), T = 200 / 256."""
    out = {}
    for gate in gates:
        for T in (200, 256):
            want = delta_rule_reference(*inputs(gate, T, quick, seed=7, dtype=torch.float64))
            for impl in impls:
                if (impl == "fla_chunk" and gate == "kda") != (T == 256):
                    continue
                with torch.inference_mode():
                    o, s = impl_fn(impl, gate, inputs(gate, T, quick, seed=7), fla)()
                out[gate, impl] = max((o.double() - want[0]).abs().max().item(),
                                      (s.double() - want[1]).abs().max().item())
    return out


def prefill(args: argparse.Namespace, fla, emit) -> None:
    sizes = [128, 512] if args.quick else [1024, 8192, 32768]
    impls = IMPLS if fla else IMPLS[:4]
    gates = ["gdn", "kda"]
    emit("## (a) correctness first: max abs diff vs the float64 reference (T = 200; fla chunk KDA 256)\n")
    emit("| gate | impl | max abs diff (outputs, final state) | status |")
    emit("|---|---|---|---|")
    diffs = check_all(gates, impls, args.quick, fla)
    for (gate, impl), d in diffs.items():
        emit(f"| {gate} | {LABEL[impl]} | {d:.1e} | {'ok' if d <= CHECK_TOL else 'FAILED'} |")
    emit("")
    for gate in gates[:1] if args.quick else gates:   # --quick times one gate (each case is a process)
        Hk, Hv, d = (QUICK_SHAPES if args.quick else SHAPES)[gate]
        what = "GDN (Qwen3-Next)" if gate == "gdn" else "KDA (Kimi Linear)"
        per = "key channel" if gate == "kda" else "head"
        emit(f"## (a) prefill, {what}: Hk {Hk}, Hv {Hv}, dk = dv {d}, g per {per}, "
             f"batch 1, fp32; best of 3 runs at T <= 1k, of 2 at 8k, else one (reference and fla: one)\n")
        emit("| T | impl | seconds | tokens/s | speed-up vs recurrent | peak extra MiB (VmHWM) | check vs recurrent |")
        emit("|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for T in sizes:
                base = None
                for impl in impls:
                    label = LABEL[impl]
                    if diffs[gate, impl] > CHECK_TOL:
                        emit(f"| {T:,} | {label} | FAILED (correctness check) | | | | |")
                        continue
                    if T > max_run_len(impl, sizes):
                        emit(f"| {T:,} | {label} | skipped (too slow) | | | | |")
                        continue
                    save = os.path.join(tmp, f"{gate}-{impl}-{T}.pt")
                    r = spawn(gate, impl, T, args.quick, args.fla_path, args.threads, save)
                    if "error" in r:
                        emit(f"| {T:,} | {label} | FAILED ({r['error'][:120]}) | | | | |")
                        continue
                    got = torch.load(save)
                    if base is None:
                        base, t_rec, check = got, r["s"], "(baseline)"
                    else:
                        diff = max((got[n] - base[n]).abs().max().item() for n in ("o", "s"))
                        check = f"ok ({diff:.1e})" if diff <= CROSS_TOL else f"FAILED ({diff:.1e})"
                    emit(f"| {T:,} | {label} | {r['s']:.3f} | {T / r['s']:,.0f} | {t_rec / r['s']:.2f}x | "
                         f"{r['peak'] / 2**20:,.0f} | {check} |")
        emit("")


def cold_ms(fn, iters: int) -> float:
    """Median ms of fn with the caches flushed before each call (64 MiB written), as when the other
    layers of a model run between two tokens: the state / KV cache comes from memory every time."""
    flush = torch.empty(16 << 20)
    ts = []
    for i in range(iters + 2):
        flush.fill_(i)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts[2:])[iters // 2] * 1e3


def decode(args: argparse.Namespace, emit) -> None:
    Hk, Hv, d = QUICK_SHAPES["gdn"] if args.quick else SHAPES["gdn"]
    H, Hkv = (4, 2) if args.quick else (16, 4)
    lengths = [256, 1024] if args.quick else [1024, 8192, 32768]
    iters = 5 if args.quick else 30
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = l2norm(r(1, Hk, d)), l2norm(r(1, Hk, d)), r(1, Hv, d)
    g, beta = -F.softplus(r(1, Hv)), torch.sigmoid(r(1, Hv))
    state = 0.1 * r(1, Hv, d, d)
    with torch.inference_mode():  # check: the in-place step == the recurrent form on one token
        want, want_s = fused_recurrent_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                                  initial_state=state)
        s2 = state.clone()
        ok_step = (delta_rule_step(q, k, v, g, beta, s2) - want[:, 0]).abs().max().item() < 1e-5 and \
            (s2 - want_s).abs().max().item() < 1e-5
    emit(f"## (b) decode, one token of one layer, batch 1, fp32; median of {iters}, caches flushed before each "
         f"call (64 MiB written: the other layers run in between)\n")
    emit(f"GDN state: Hv {Hv} x {d} x {d} fp32 = {Hv * d * d * 4 / 2**20:.2f} MiB at any context. Softmax "
         f"attention: {H} query heads x {d}, {Hkv} KV heads, KV cache fp32.\n")
    emit("| context L | delta_rule_step (ms) | softmax attention decode (ms) | KV cache MiB | attention / step "
         "| check |")
    emit("|---|---|---|---|---|---|")
    for L in lengths:
        qa, ka, va = r(1, 1, H, d), r(1, L, Hkv, d), r(1, L, Hkv, d)
        with torch.inference_mode():
            o = attention(qa, ka, va, causal=True, backend="torch")
            ref = F.scaled_dot_product_attention(qa.transpose(1, 2), ka.transpose(1, 2).repeat_interleave(H // Hkv, 1),
                                                 va.transpose(1, 2).repeat_interleave(H // Hkv, 1)).transpose(1, 2)
            ok = ok_step and (o - ref).abs().max().item() < 1e-5
            st = state.clone()
            ms = cold_ms(lambda: delta_rule_step(q, k, v, g, beta, st), iters)
            ma = cold_ms(lambda: attention(qa, ka, va, causal=True, backend="torch"), iters)
        emit(f"| {L:,} | {ms:.3f} | {ma:.3f} | {2 * L * Hkv * d * 4 / 2**20:,.0f} | {ma / ms:.1f}x | "
             f"{'ok' if ok else 'FAILED'} |")
    emit("")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke test)")
    ap.add_argument("--threads", type=int, help="torch threads (default 2; 1 with --quick: tiny ops on 2 threads "
                    "stall behind any other job)")
    ap.add_argument("--fla-path", default=os.environ.get("FLA_PATH"),
                    help="directory holding fla-core (pip install --no-deps --target DIR fla-core einops)")
    ap.add_argument("--out", help="also write the report (markdown) to this file, e.g. bench/results/...")
    ap.add_argument("--case", nargs=3, metavar=("GATE", "IMPL", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    if args.case:
        gate, impl, T = args.case
        print(json.dumps(case(gate, impl, int(T), args.quick, args.fla_path, args.save)))
        return 0

    lines: list[str] = []

    def emit(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    emit(f"# Gated delta rule benchmark{' (--quick)' if args.quick else ''}\n")
    emit(f"- machine: {machine()}")
    # another job on a core stalls 2-thread barriers; the load average says whether that happened
    load = os.getloadavg()[0]
    emit(f"- load average at start: {load:.2f}" + (" (another job is running: 2-thread timings stall behind it; "
                                                    "rerun idle, or with --threads 1)" if load > 1 and args.threads > 1
                                                    else ""))
    fla = load_fla(args.fla_path)  # after every other import: fla binds Triton kernels when imported
    if fla is None:
        args.fla_path = None
    emit(f"- {'fla-core from ' + args.fla_path + ' (naive PyTorch forms)' if fla else FLA_MISSING}\n")
    t0 = time.perf_counter()
    prefill(args, fla, emit)
    decode(args, emit)
    emit(f"total {time.perf_counter() - t0:.0f} s; load average at the end: {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
