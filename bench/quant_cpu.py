"""Weight-only int4/int8 matmuls on the CPU (ops/quant.py) against fp32 and bf16 linears, then a model.

    python bench/quant_cpu.py [--model smollm2] [--new-tokens 64] [--repeats 7] [--quick] [--no-model]

--quick: M = 1 and 32, a tenth of the calls per timing, three whole-model variants (bf16, int4, int8), 8 tokens, one timed run: a smoke test.

1. Per SmolLM2-135M matrix (K x N), M = 1 (decode), 4 and 32: F.linear in fp32 and bf16, int8 and int4
   (group 32) with fp32 and bf16 activations. Each quantised product is first checked against the fp32
   matmul of its own dequantised weight; times are the best of --repeats, each the mean of a batch of calls.
2. Quantisation error on the model's real weights: the GGUF's own Q4_1 blocks packed as int4 (exact),
   int4 requantised from the float weights, and Q8_0 blocks requantised to one int8 scale per row.
3. Whole model (bf16, as `attnzoo.load_model(..., dtype="bfloat16")`): `quantize_model` variants, greedy
   tokens of 4 chat prompts compared with the float model, single-stream decode tok/s (best of 3), one run.
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
from attnzoo.layers.quant import quantize_model
from attnzoo.ops.quant import (
    dequantize,
    fit_int4,
    pack,
    quant_linear,
    quantize_int4,
    quantize_int8,
    unpack_gguf,
)

SHAPES = {"qkv_proj": (576, 960), "o_proj": (576, 576), "gate_up_proj": (576, 3072), "down_proj": (1536, 576),
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


@torch.inference_mode()
def matrices(repeats: int, ms: tuple[int, ...], work: float = 2e5) -> None:
    print("\n## 1. one matrix, us per call (best of runs); in brackets: speed-up vs bf16 F.linear")
    print("| matrix | K x N | M | fp32 | bf16 | int8 fp32-act | int8 bf16-act | int4 fp32-act | int4 bf16-act |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, (K, N) in SHAPES.items():
        w = torch.randn(N, K, generator=g) * K ** -0.5
        wb = w.bfloat16()
        quants = {(kind, dt): (quantize_int4 if kind == "int4" else quantize_int8)(w, dtype=dt)
                  for kind in ("int8", "int4") for dt in (torch.float32, torch.bfloat16)}
        own = {key: dequantize(qw).T for key, qw in quants.items()}   # each product's own weights in fp32
        for M in ms:
            x = torch.randn(M, K, generator=g)
            xb = x.bfloat16()
            for (kind, dt), qw in quants.items():  # correctness first: each against its own weights in fp32
                xx = x if dt == torch.float32 else xb
                err = rel(quant_linear(xx, qw), xx.float() @ own[kind, dt])
                if err > (1e-5 if dt == torch.float32 else 1e-2):
                    raise SystemExit(f"FAILED: {kind} {dt} {name} M={M}: relative error {err:.2e}; no times reported")
            calls = max(3, int(work // (K * N // 64 + 1)))
            t = {"fp32": best_us(lambda: F.linear(x, w), repeats, calls),
                 "bf16": best_us(lambda: F.linear(xb, wb), repeats, calls)}
            for (kind, dt), qw in quants.items():
                xx = x if dt == torch.float32 else xb
                t[f"{kind} {dt}"] = best_us(lambda: quant_linear(xx, qw), repeats, calls)
            cells = [f"{v:.0f} ({t['bf16'] / v:.1f}x)" for v in t.values()]
            print(f"| {name} | {K} x {N} | {M} | " + " | ".join(cells) + " |")


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
    print("| tensor | file type | file blocks -> packed vs file's float | int4 refit from float | "
          "Q8_0 of float vs float | Q8_0 of float -> int8 per row vs Q8_0 |")
    print("|---|---|---|---|---|---|")
    for t in reader.tensors:
        if not (t.name.startswith("blk.0.") or t.name == "token_embd.weight") or len(t.shape) != 2:
            continue
        N, K = int(t.shape[1]), int(t.shape[0])
        w = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(N, K))
        exact = "-"
        if t.tensor_type in (T.Q4_0, T.Q4_1, T.Q8_0) and N % 16 == 0:  # Q8_0: requantised per row
            exact = f"{rel(dequantize(pack(unpack_gguf(t.data, t.tensor_type, (N, K)))), w):.1e}"
        refit = rel(dequantize(pack(fit_int4(w, 32))), w) if N % 16 == 0 else float("nan")
        q8 = gguf.quants.quantize(w.numpy(), T.Q8_0)
        b8 = unpack_gguf(q8, T.Q8_0, (N, K))
        per_row = rel(dequantize(pack(b8)), b8.dequantize())
        print(f"| {t.name} | {t.tensor_type.name} | {exact} | {refit:.1e} | {rel(b8.dequantize(), w):.1e} | "
              f"{per_row:.1e} |")


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


@torch.inference_mode()
def whole_model(model_name: str, n: int, n_check: int, quick: bool = False) -> None:
    base = attnzoo.load_model(model_name, dtype="bfloat16")
    tok = base.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    variants = {"bf16 (float)": (None, None), "int4, lm_head bf16": ("int4", {"lm_head": None}),
                "int4, lm_head int8 (default)": ("int4", None), "int4, lm_head int4": ("int4", {}),
                "int8, lm_head bf16": ("int8", {"lm_head": None}), "int8, lm_head int8": ("int8", {})}
    if quick:   # one variant per kind of kernel, one timed run each
        variants = {k: v for k, v in variants.items() if k in ("bf16 (float)", "int4, lm_head int8 (default)",
                                                                 "int8, lm_head int8")}
    print(f"\n## 3. whole model: {model_name} loaded in bf16, quantize_model from its float weights; greedy, "
          f"1 stream, {n} new tokens (best of {1 if quick else 3}); agreement: {len(prompts)} chat prompts x {n_check} tokens")
    print("| variant | linears quantised | decode tok/s | vs bf16 | prompts identical | tokens matched |")
    print("|---|---|---|---|---|---|")
    ref, ref_speed = None, None
    for label, (kind, overrides) in variants.items():
        model = base if kind is None else copy.deepcopy(base)
        names = {} if kind is None else quantize_model(model, kind, overrides=overrides)
        llm = LLM(model, max_num_seqs=1, enable_prefix_caching=False)
        outs = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=n_check, temperature=0,
                                                                          ignore_eos=True), use_tqdm=False)]
        ref = ref or outs
        same = sum(a == b for a, b in zip(outs, ref))
        prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(outs, ref))
        speed = decode_speed(model, prompts[0], n, runs=1 if quick else 3)
        ref_speed = ref_speed or speed
        print(f"| {label} | {len(names)} | {speed:.1f} | {speed / ref_speed:.2f}x | {same}/{len(prompts)} | "
              f"{prefix}/{len(prompts) * n_check} (common prefixes) |")
        if kind is None:  # the noise floor: how far fp32 weights and activations land from bf16
            full = attnzoo.load_model(model_name, dtype="float32")
            f32 = [o.token_ids for o in LLM(full, max_num_seqs=1, enable_prefix_caching=False).generate(
                prompts, SamplingParams(max_tokens=n_check, temperature=0, ignore_eos=True), use_tqdm=False)]
            del full
            print(f"| fp32 (float), for scale | 0 | - | - | {sum(a == b for a, b in zip(f32, ref))}/{len(prompts)} | "
                  f"{sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(f32, ref))}"
                  f"/{len(prompts) * n_check} (common prefixes) |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="few repeats, short generations: a smoke test")
    ap.add_argument("--no-model", action="store_true", help="only the matrices")
    args = ap.parse_args(argv)
    n_check = 32
    if args.quick:
        args.repeats, args.new_tokens, n_check = 2, 8, 8
    print(f"# machine: {machine()}; CPU flags: {cpu_flags()}")
    matrices(args.repeats, (1, 32) if args.quick else (1, 4, 32), 2e4 if args.quick else 2e5)
    if not args.no_model:
        weight_errors(args.model)
        whole_model(args.model, args.new_tokens, n_check, args.quick)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
