"""What deterministic mode costs: the engine with and without `deterministic=True`, in one run.

    python bench/deterministic.py [--model smollm2] [--dtypes float32,bfloat16] [--quick]

--quick: the dtype "auto" resolves to on this CPU, 3 prompts, 8 tokens: a smoke test of the script.

Per dtype, first the checks (no speed is reported if one fails): in deterministic mode, greedy outputs of
8 chat prompts are identical alone, all together, with the prefix cache off, in 16-token prefill chunks,
with a pool small enough to preempt, and equal to the reference generator under `batch_invariant()`.
The default mode's agreement on the same runs is printed beside it (it promises no such thing). Then
the speeds of both modes: single-stream decode, prefill of a long prompt, and 32 requests at once.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import auto_dtype_name, cpu_flags, machine

import attnzoo
from attnzoo import LLM, SamplingParams
from attnzoo.engine import GenerationConfig, generate
from attnzoo.engine.cache_plan import page_bytes
from attnzoo.ops.batch_invariant import batch_invariant

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly.",
             "List three fruits.", "Who wrote Hamlet?", "What is 12 times 12?", "Describe a cat.",
             "Why is the sky blue?"]


def greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    llm.check_integrity()
    return [o.token_ids for o in outs]


def agreement(model, prompts: list[list[int]], n: int, deterministic: bool) -> dict[str, int]:
    """How many requests keep their tokens across batchings (out of len(prompts) each)."""
    kw = dict(deterministic=deterministic, kv_cache_memory=64 << 20)
    base = greedy(LLM(model, **kw), prompts, n)
    solo_llm = LLM(model, **kw, enable_prefix_caching=False)
    runs = {
        "alone": [greedy(solo_llm, [p], n)[0] for p in prompts],
        "prefix cache off": greedy(LLM(model, **kw, enable_prefix_caching=False), prompts, n),
        "16-token chunks": greedy(LLM(model, **kw, max_num_batched_tokens=16), prompts, n),
    }
    pages = sum(-(-len(p) // 16) for p in prompts)   # every prompt fits; their growth must preempt
    small = LLM(model, deterministic=deterministic, page_size=16, max_num_batched_tokens=64,
                kv_cache_memory=pages * page_bytes(model.cache_specs(), 16, model.embed_tokens.weight.dtype))
    runs["preempted"] = greedy(small, prompts, n)
    if deterministic:
        assert small.scheduler.num_preemptions > 0, "the small pool did not preempt"
        with batch_invariant():
            runs["reference generator"] = [generate(model, p, GenerationConfig(max_tokens=n)) for p in prompts]
    return {k: sum(a == b for a, b in zip(v, base)) for k, v in runs.items()}


def speeds(model, prompts: list[list[int]], long_prompt: list[int], n: int, deterministic: bool) -> tuple:
    llm = LLM(model, deterministic=deterministic, kv_cache_memory=512 << 20, enable_prefix_caching=False)
    greedy(llm, prompts[:1], 4)                                   # warm-up
    stamps, t0 = [], time.perf_counter()
    for _ in llm.stream(prompts[0], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
        stamps.append(time.perf_counter() - t0)
    single = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    t0 = time.perf_counter()
    greedy(llm, [long_prompt], 1)
    prefill = len(long_prompt) / (time.perf_counter() - t0)
    batch = (prompts * 4)[:32]
    t0 = time.perf_counter()
    greedy(llm, batch, n)
    return single, prefill, len(batch) * n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    args = ap.parse_args(argv)
    n_check = 24
    if args.quick:  # the dtype this CPU runs by default (bf16 is emulated, and slow, without native bf16)
        args.new_tokens, args.prompt_tokens, n_check = 8, 64, 16   # 16: the small pool must preempt
        args.dtypes = auto_dtype_name()
    print(f"# machine: {machine()}; CPU flags: {cpu_flags()}")
    rows, checks = [], []
    for dtype in args.dtypes.split(","):
        model = attnzoo.load_model(args.model, dtype=dtype)
        tok = model.tokenizer
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
        if args.quick:
            prompts = prompts[:3]
        long_prompt = tok.encode(" ".join(["the history of rivers, mountains and cities"] * 200))[:args.prompt_tokens]
        det, default = agreement(model, prompts, n_check, True), agreement(model, prompts, n_check, False)
        failed = [k for k, v in det.items() if v != len(prompts)]
        if failed:
            raise SystemExit(f"FAILED: deterministic mode ({dtype}) changed tokens for {failed}: {det}; no speed reported")
        checks.append((dtype, len(prompts), det, default))
        for mode in (False, True):
            rows.append((dtype, "deterministic" if mode else "default",
                         *speeds(model, prompts, long_prompt, args.new_tokens, mode)))
    print(f"\n## checks: greedy requests ({n_check} tokens) equal to the all-at-once run")
    print("| dtype | mode | " + " | ".join(checks[0][2]) + " |")
    print("|---|---|" + "---|" * len(checks[0][2]))
    for dtype, n, det, default in checks:
        print(f"| {dtype} | deterministic | " + " | ".join(f"{v}/{n}" for v in det.values()) + " |")
        print(f"| {dtype} | default | " + " | ".join(f"{default.get(k, '-')}/{n}" if k in default else "-"
                                                    for k in det) + " |")
    print(f"\n## speed: 1 stream ({args.new_tokens} new tokens), prefill of {args.prompt_tokens} tokens, "
          f"32 requests x {args.new_tokens} tokens")
    print("| dtype | mode | 1-stream decode tok/s | prefill tok/s | 32 requests tok/s | vs default |")
    print("|---|---|---|---|---|---|")
    base = {}
    for dtype, mode, single, prefill, batch in rows:
        b = base.setdefault(dtype, (single, prefill, batch))
        rel = "" if mode == "default" else f"{single / b[0]:.2f}x / {prefill / b[1]:.2f}x / {batch / b[2]:.2f}x"
        print(f"| {dtype} | {mode} | {single:.1f} | {prefill:.0f} | {batch:.0f} | {rel} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
