"""Weight-only int4/int8 matmuls on the CPU (ops/quant.py) and GGUF blocks through our C++ kernel
(ops/quant_kernels.py) against fp32 and bf16 linears, then a model.

    python bench/quant_cpu.py [--model smollm2] [--new-tokens 64] [--repeats 7] [--quick] [--no-model]
                              [--crossover]

--quick: M = 1 and 32, a tenth of the calls per timing, three whole-model variants on two prompts (bf16, int4, GGUF
blocks), 8 tokens, one timed run: a smoke test. Prints the C++ kernel's ISA (which SIMD path ran).

1. Per SmolLM2-135M matrix (K x N; the separate projections and the fused ones the engine runs), M = 1
   (decode) to 32: F.linear in fp32 and bf16, torch's int8 and int4 (group 32) with fp32 and bf16
   activations, and the C++ kernel on Q4_0, Q4_1 and Q8_0 blocks (fp32 activations). Each quantised
   product is first checked: torch's against the fp32 matmul of its own dequantised weight, ours against
   its PyTorch reference; times are the best of --repeats, each the mean of a batch of calls.
   --crossover (instead of 1): the C++ kernel's integer path against its dequantised-panel + at::mm path and
   fp32 F.linear for M up to 4096: where the panel path starts to win is the op's panel_m.
2. Quantisation error on the model's real weights: the GGUF's own Q4_1 blocks packed as int4 (exact),
   kept as shipped for the C++ kernel (exact), int4 requantised from the float weights, and Q8_0 blocks
   requantised to one int8 scale per row.
3. Whole model (bf16, as `attnzoo.load_model(..., dtype="bfloat16")`): `quantize_model` variants and the
   file's own blocks through the C++ kernel (`load_model(quantization="gguf")` with fp32 and with bf16
   activations), greedy tokens of 4 chat prompts compared with the float model, single-stream decode tok/s
   (best of 3), one run.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import cpu_flags, machine

import attnzoo
from attnzoo import LLM, SamplingParams
from attnzoo.layers.quant import QuantLinear, quantize_model
from attnzoo.ops import quant_kernels
from attnzoo.ops.quant import (
    HAVE_KERNEL,
    dequantize,
    fit_int4,
    fit_q8_0,
    pack,
    q_kind,
    quant_linear,
    quantize_int4,
    quantize_int8,
    unpack_gguf,
)

SHAPES = {"q_proj, o_proj": (576, 576), "k_proj, v_proj": (576, 192), "gate_proj, up_proj": (576, 1536),
          "down_proj": (1536, 576), "qkv_proj (fused)": (576, 960), "gate_up_proj (fused)": (576, 3072),
          "lm_head": (576, 49152)}
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly.",
             "Why is the sky blue?"]


def best_us(fn, repeats: int, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gguf_weights(w: torch.Tensor) -> dict[str, object]:
    """w as the three GGUF kinds for the C++ kernel: Q4_1 and Q8_0 fitted, Q4_0 from gguf's own quantiser."""
    import gguf
    N, K = w.shape
    q40 = unpack_gguf(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0,
                      (N, K))
    return {"q4_0": pack(q40, "q4_0"), "q4_1": pack(fit_int4(w, 32), "q4_1"), "q8_0": pack(fit_q8_0(w), "q8_0")}


def check_ours(name: str, M: int, x: torch.Tensor, qw) -> None:
    """The kernel against its reference: they differ by float rounding of the scale arithmetic only
    (tests/ops/test_quant_kernels.py)."""
    ref = quant_kernels.reference_q_linear(x, qw.packed, qw.scales, qw.kind, qw.N, qw.K)
    err = rel(quant_linear(x, qw), ref)
    if err > 1e-5:
        raise SystemExit(f"FAILED: {qw.kind} {name} M={M}: relative error {err:.2e} vs the reference; "
                         "no times reported")


@torch.inference_mode()
def matrices(repeats: int, ms: tuple[int, ...], work: float = 2e5) -> None:
    print("\n## 1. one matrix, us per call (best of runs); in brackets: speed-up vs bf16 F.linear")
    ours = list(gguf_weights(torch.zeros(8, 32))) if HAVE_KERNEL else []
    print("| matrix | K x N | M | fp32 | bf16 | int8 fp32-act | int8 bf16-act | int4 fp32-act | int4 bf16-act | "
          + "".join(f"{k} (C++) | " for k in ours))
    print("|---|---|---|" + "---|" * (6 + len(ours)))
    g = torch.Generator().manual_seed(0)
    for name, (K, N) in SHAPES.items():
        w = torch.randn(N, K, generator=g) * K ** -0.5
        wb = w.bfloat16()
        quants = {(kind, dt): (quantize_int4 if kind == "int4" else quantize_int8)(w, dtype=dt)
                  for kind in ("int8", "int4") for dt in (torch.float32, torch.bfloat16)}
        own = {key: dequantize(qw).T for key, qw in quants.items()}   # each product's own weights in fp32
        mine = gguf_weights(w) if HAVE_KERNEL else {}
        for M in ms:
            x = torch.randn(M, K, generator=g)
            xb = x.bfloat16()
            for (kind, dt), qw in quants.items():  # correctness first: each against its own weights in fp32
                xx = x if dt == torch.float32 else xb
                err = rel(quant_linear(xx, qw), xx.float() @ own[kind, dt])
                if err > (1e-5 if dt == torch.float32 else 1e-2):
                    raise SystemExit(f"FAILED: {kind} {dt} {name} M={M}: relative error {err:.2e}; no times reported")
            for qw in mine.values():
                check_ours(name, M, x, qw)
            calls = max(3, int(work // (K * N // 64 + 1)))
            t = {"fp32": best_us(lambda: F.linear(x, w), repeats, calls),
                 "bf16": best_us(lambda: F.linear(xb, wb), repeats, calls)}
            for (kind, dt), qw in quants.items():
                xx = x if dt == torch.float32 else xb
                t[f"{kind} {dt}"] = best_us(lambda: quant_linear(xx, qw), repeats, calls)
            for kind, qw in mine.items():
                t[kind] = best_us(lambda: quant_linear(x, qw), repeats, calls)
            cells = [f"{v:.0f} ({t['bf16'] / v:.1f}x)" for v in t.values()]
            print(f"| {name} | {K} x {N} | {M} | " + " | ".join(cells) + " |")


@torch.inference_mode()
def crossover(repeats: int, ms: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
              max_macs: float = 8e9) -> None:
    """The C++ op's two paths, per M: integer dot products on 8-bit activations vs dequantised fp32 panels
    multiplied by at::mm (and fp32 F.linear on float weights, for scale); products over max_macs are skipped."""
    panel_m = quant_kernels.config()["panel_m"]
    print(f"\n## 1'. the C++ kernel's paths, us per call (best of runs); the op's panel_m now: {panel_m}")
    print("| matrix | K x N | kind | M | integer path | panel + at::mm | fp32 F.linear | integer / panel |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    try:
        for name in ("q_proj, o_proj", "gate_up_proj (fused)", "down_proj", "lm_head"):
            K, N = SHAPES[name]
            w = torch.randn(N, K, generator=g) * K ** -0.5
            for kind, qw in gguf_weights(w).items():
                if kind == "q4_0":
                    continue   # as q4_1, one scale fewer
                for M in (m for m in ms if m * N * K <= max_macs):
                    x = torch.randn(M, K, generator=g)
                    calls = max(2, int(2e5 // (K * N * M ** 0.5 // 64 + 1)))
                    quant_kernels.config(panel_m=1 << 30)
                    check_ours(name, M, x, qw)
                    t_int = best_us(lambda: quant_linear(x, qw), repeats, calls)
                    quant_kernels.config(panel_m=1)
                    if rel(quant_linear(x, qw), x @ dequantize(qw).T) > 1e-5:
                        raise SystemExit(f"FAILED: the panel path of {kind} {name} M={M}; no times reported")
                    t_panel = best_us(lambda: quant_linear(x, qw), repeats, calls)
                    t_f = best_us(lambda: F.linear(x, w), repeats, calls)
                    print(f"| {name} | {K} x {N} | {kind} | {M} | {t_int:.0f} | {t_panel:.0f} | {t_f:.0f} | "
                          f"{t_int / t_panel:.2f} |", flush=True)
    finally:
        quant_kernels.config(panel_m=panel_m)


@torch.inference_mode()
def weight_errors(model_name: str) -> None:
    """Real weights: the file's Q4_1 blocks are exact as int4; requantising costs what it costs."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from attnzoo.models.gguf_loader import open_gguf
    from attnzoo.models.registry import resolve
    path = resolve(model_name)
    reader, _ = open_gguf(path)
    print(f"\n## 2. quantisation error on {path.name}'s weights (relative Frobenius error)")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    print(f"- tensor types in the file: {', '.join(types)}")
    print("| tensor | file type | file blocks -> packed vs file's float | kept as shipped (C++ kernel) | "
          "int4 refit from float | Q8_0 of float vs float | Q8_0 of float -> int8 per row vs Q8_0 |")
    print("|---|---|---|---|---|---|---|")
    for t in reader.tensors:
        if not (t.name.startswith("blk.0.") or t.name == "token_embd.weight") or len(t.shape) != 2:
            continue
        N, K = int(t.shape[1]), int(t.shape[0])
        w = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(N, K))
        exact = shipped = "-"
        if t.tensor_type in (T.Q4_0, T.Q4_1, T.Q8_0) and N % 16 == 0:  # Q8_0: requantised per row
            exact = f"{rel(dequantize(pack(unpack_gguf(t.data, t.tensor_type, (N, K)))), w):.1e}"
        if t.tensor_type in (T.Q4_0, T.Q4_1, T.Q8_0):
            b = unpack_gguf(t.data, t.tensor_type, (N, K))
            shipped = f"{rel(dequantize(pack(b, q_kind(b))), w):.1e}"
        refit = rel(dequantize(pack(fit_int4(w, 32))), w) if N % 16 == 0 else float("nan")
        q8 = gguf.quants.quantize(w.numpy(), T.Q8_0)
        b8 = unpack_gguf(q8, T.Q8_0, (N, K))
        per_row = rel(dequantize(pack(b8)), b8.dequantize())
        print(f"| {t.name} | {t.tensor_type.name} | {exact} | {shipped} | {refit:.1e} | "
              f"{rel(b8.dequantize(), w):.1e} | {per_row:.1e} |")


def decode_speed(model, prompt: list[int], n: int, runs: int = 3) -> float:
    llm = LLM(model, max_num_seqs=1, enable_prefix_caching=False)
    list(llm.stream(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))  # warm-up
    best = 0.0
    for _ in range(runs):
        stamps, t0 = [], time.perf_counter()
        for _ in llm.stream(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
            stamps.append(time.perf_counter() - t0)
        best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return best


def agreement(outs: list[list[int]], ref: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(outs, ref))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(outs, ref))
    return f"{same}/{len(ref)} | {prefix}/{sum(len(r) for r in ref)} (common prefixes)"


@torch.inference_mode()
def whole_model(model_name: str, n: int, n_check: int, quick: bool = False) -> None:
    base = attnzoo.load_model(model_name, dtype="bfloat16")
    tok = base.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
               for q in QUESTIONS[:2 if quick else None]]

    def quantized(kind: str, overrides: dict | None):
        def build():
            model = copy.deepcopy(base)
            return model, len(quantize_model(model, kind, overrides=overrides))
        return build

    def shipped(dtype: str):  # the C++ kernel on the file's own blocks (lm_head: its Q8_0 embedding)
        def build():
            model = attnzoo.load_model(model_name, dtype=dtype, quantization="gguf")
            return model, sum(isinstance(m, QuantLinear) for m in model.modules())
        return build

    int4, gguf = "int4, lm_head int8 (quantization=int4)", "GGUF blocks (quantization=gguf), fp32 model"
    variants = {"bf16 (float)": lambda: (base, 0), "int4, lm_head bf16": quantized("int4", {"lm_head": None}),
                int4: quantized("int4", None), "int4, lm_head int4": quantized("int4", {}),
                "int8, lm_head bf16": quantized("int8", {"lm_head": None}), "int8, lm_head int8": quantized("int8", {})}
    if HAVE_KERNEL:
        variants |= {gguf: shipped("float32"), "GGUF blocks (quantization=gguf), bf16 model": shipped("bfloat16")}
    if quick:   # the float reference and one variant per 4-bit kernel, one timed run each, two prompts
        variants = {k: v for k, v in variants.items() if k in ("bf16 (float)", int4, gguf)}
    kernel = f"C++ kernel: {quant_kernels.config()['isa']}" if HAVE_KERNEL else "C++ kernel not built"
    print(f"\n## 3. whole model: {model_name} loaded in bf16, quantize_model from its float weights, or its GGUF "
          f"blocks as shipped ({kernel}); greedy, 1 stream, {n} new tokens (best of {1 if quick else 3}); "
          f"agreement with bf16: {len(prompts)} chat prompts x {n_check} tokens")
    print("| variant | linears quantised | decode tok/s | vs bf16 | prompts identical | tokens matched |")
    print("|---|---|---|---|---|---|")
    ref, ref_speed = None, None
    params = SamplingParams(max_tokens=n_check, temperature=0, ignore_eos=True)
    for label, build in variants.items():
        model, n_quant = build()
        outs = [o.token_ids for o in LLM(model, max_num_seqs=1, enable_prefix_caching=False).generate(
            prompts, params, use_tqdm=False)]
        ref = ref or outs
        speed = decode_speed(model, prompts[0], n, runs=1 if quick else 3)
        ref_speed = ref_speed or speed
        print(f"| {label} | {n_quant} | {speed:.1f} | {speed / ref_speed:.2f}x | {agreement(outs, ref)} |")
        if n_quant == 0:  # the noise floor: how far fp32 weights and activations land from bf16
            full = attnzoo.load_model(model_name, dtype="float32")
            f32 = [o.token_ids for o in LLM(full, max_num_seqs=1, enable_prefix_caching=False).generate(
                prompts, params, use_tqdm=False)]
            del full
            print(f"| fp32 (float), for scale | 0 | - | - | {agreement(f32, ref)} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="few repeats, short generations: a smoke test")
    ap.add_argument("--no-model", action="store_true", help="only the matrices")
    ap.add_argument("--crossover", action="store_true",
                    help="the C++ kernel's integer path vs its dequantised-panel path, M up to 4096 (then stop)")
    args = ap.parse_args(argv)
    n_check = 32
    if args.quick:
        args.repeats, args.new_tokens, n_check = 2, 8, 8
    kernel = (f"C++ kernel: {quant_kernels.config()['isa']} (best here: {quant_kernels.config()['best']})"
              if HAVE_KERNEL else f"C++ kernel not built ({quant_kernels.KERNEL_ERROR})")
    print(f"# machine: {machine()}; CPU flags: {cpu_flags()}; {kernel}")
    if args.crossover:
        if not HAVE_KERNEL:
            raise SystemExit("--crossover times the C++ kernel, which is not built")
        return crossover(args.repeats)
    matrices(args.repeats, (1, 32) if args.quick else (1, 2, 4, 8, 16, 32), 2e4 if args.quick else 2e5)
    if not args.no_model:
        weight_errors(args.model)
        whole_model(args.model, args.new_tokens, n_check, args.quick)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
