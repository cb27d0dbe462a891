"""Prefix caching: SGLang's generated-shared-prefix workload with the radix cache on vs off.

    python bench/prefix_cache.py [--groups 4] [--prompts-per-group 16] [--system-len 1024]
                                 [--question-len 32] [--output-len 16] [--dtype float32] [--quick]
    python bench/prefix_cache.py --hybrid ...   # Qwen3-Next- and Cohere2-shaped models beside a Llama-shaped one
    attnzoo bench prefix_cache ...

--hybrid builds three small random models from config dicts (no checkpoint needed), the same size: a
Llama-shaped one (every layer full attention), a Qwen3-Next-shaped one (3 Gated DeltaNet layers per full
attention layer: prefix hits restore state snapshots) and a Cohere2-shaped one (3 sliding-window layers per
global layer, window 256: hits need the window's pages), and runs the same workload on each.

Each group has a long system prompt shared by its prompts; every prompt adds its own question. All
requests arrive at once. Reports mean/median time to first token, output throughput, and the hit
rate (prompt tokens served from the cache). The outputs with the cache on must equal those with it
off (greedy) before any speed is printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from common import cpu_flags, machine

import attnzoo
from attnzoo.engine import LLM, SamplingParams
from attnzoo.models import DecoderLM
from attnzoo.models.hf_loader import config_from_hf
from attnzoo.models.weights import model_class

SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
HYBRIDS = {
    "llama-shaped (full attention)": dict(SMALL, model_type="llama"),
    "qwen3_next-shaped (GDN 3:1)": dict(SMALL, model_type="qwen3_next", full_attention_interval=4, num_experts=0,
                                        mlp_only_layers=list(range(12)), linear_num_key_heads=4,
                                        linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
                                        linear_conv_kernel_dim=4),
    "cohere2-shaped (SWA 3:1, window 256)": dict(SMALL, model_type="cohere2", sliding_window=256, logit_scale=1.0,
                                                 layer_types=["sliding_attention", "sliding_attention",
                                                              "sliding_attention", "full_attention"] * 3),
}


def small_model(raw: dict, dtype: torch.dtype) -> DecoderLM:
    """Random weights, large enough that greedy continuations are not near-ties; gates and norms that
    start at zero or one are randomised too."""
    cfg = config_from_hf(raw)
    torch.manual_seed(0)
    model = model_class(cfg)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("A_log", "dt_bias")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 1.5 / p.shape[-1] ** 0.5)
    return model.to(dtype)


def workload(groups: int, per_group: int, sys_len: int, q_len: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    tok = lambda n: [rnd.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    systems = [tok(sys_len) for _ in range(groups)]
    return [systems[g] + tok(q_len) for g in range(groups) for _ in range(per_group)]


def run(llm: LLM, prompts: list[list[int]], out_len: int) -> tuple[dict, list[list[int]]]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True), use_tqdm=False)
    dt = time.perf_counter() - t0
    llm.check_integrity()
    ttft = [o.metrics.time_to_first_token for o in outs]
    cached = sum(o.cached_tokens for o in outs)
    return ({"mean_ttft": statistics.mean(ttft), "median_ttft": statistics.median(ttft),
             "throughput": len(prompts) * out_len / dt, "hit_rate": cached / sum(map(len, prompts)), "total_s": dt},
            [o.token_ids for o in outs])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompts-per-group", type=int, default=16, help="16 as in SGLang's defaults")
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="float32 (default: the strict correctness check) or bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hybrid", action="store_true", help="hybrid models beside a full-attention one (see above)")
    args = ap.parse_args(argv)
    if args.quick:
        args.groups, args.prompts_per_group, args.system_len, args.question_len, args.output_len = 2, 3, 64, 8, 4
    print(f"# machine: {machine()}; CPU flags: {cpu_flags()}")
    prompts = workload(args.groups, args.prompts_per_group, args.system_len, args.question_len, args.seed)
    if args.hybrid:
        dtype = getattr(torch, args.dtype)
        rows = {name: compare(small_model(raw, dtype), prompts, args.output_len) for name, raw in HYBRIDS.items()}
        print(f"\n{args.groups} groups x {args.prompts_per_group} prompts, shared system prompt {args.system_len} "
              f"tokens + {args.question_len}-token question, {args.output_len} output tokens, all at once, {dtype}; "
              f"models: hidden 512, 12 layers, 8 heads (2 KV) of 64\n")
        print("| model | outputs equal | mean TTFT off | mean TTFT on | TTFT off/on | hit rate | tok/s off | tok/s on |")
        print("|---|---|---|---|---|---|---|---|")
        for name, (off, on_, same) in rows.items():
            print(f"| {name} | {same}/{len(prompts)} | {off['mean_ttft']:.2f} s | {on_['mean_ttft']:.2f} s | "
                  f"{off['mean_ttft'] / on_['mean_ttft']:.1f}x | {100 * on_['hit_rate']:.0f}% | "
                  f"{off['throughput']:.1f} | {on_['throughput']:.1f} |")
        return
    model = attnzoo.load_model(args.model, dtype=args.dtype)
    off, on_, same = compare(model, prompts, args.output_len)
    print(f"# correctness: {same}/{len(prompts)} greedy outputs identical with the cache on and off")
    print(f"\n{args.groups} groups x {args.prompts_per_group} prompts, shared system prompt {args.system_len} "
          f"tokens + {args.question_len}-token question, {args.output_len} output tokens, all at once, "
          f"{model.embed_tokens.weight.dtype}\n")
    print("| radix cache | mean TTFT | median TTFT | output tok/s | hit rate | wall |")
    print("|---|---|---|---|---|---|")
    for name, r in (("off", off), ("on", on_)):
        print(f"| {name} | {r['mean_ttft']:.2f} s | {r['median_ttft']:.2f} s | {r['throughput']:.1f} | "
              f"{100 * r['hit_rate']:.0f}% | {r['total_s']:.1f} s |")
    print(f"\nmean TTFT off/on: {off['mean_ttft'] / on_['mean_ttft']:.1f}x lower with the cache")


def compare(model: DecoderLM, prompts: list[list[int]], output_len: int = 16) -> tuple[dict, dict, int]:
    """The workload with the radix cache off, then on (each after a warm-up, cold cache); exits before any
    speed is reported when the outputs disagree beyond near-ties."""
    prompts = [[t % model.config.vocab_size for t in p] for p in prompts]
    results = {}
    for on in (False, True):
        llm = LLM(model, kv_cache_memory=1 << 30, enable_prefix_caching=on)
        run(llm, prompts[:1], 2)  # warm-up (then clear, so the measured run starts cold)
        llm.clear_prefix_cache()
        results[on] = run(llm, prompts, output_len)
    (off, off_ids), (on_, on_ids) = results[False], results[True]
    # correctness first. Cached KV was computed in another batch than the uncached run's, so its last bits
    # can differ; greedy continuations of random-token prompts then part only at near-ties. fp32 must agree
    # almost everywhere; bf16 rounds 65000x coarser, so it gets a looser bar (the tests prove exactness).
    same = sum(a == b for a, b in zip(off_ids, on_ids))
    need = (0.95 if model.embed_tokens.weight.dtype == torch.float32 else 0.75) * len(prompts)
    if same < need:
        raise SystemExit(f"FAILED: only {same}/{len(prompts)} outputs equal with the cache on; no speed reported")
    return off, on_, same


if __name__ == "__main__":
    main()
