"""SWA/global hybrids: what window-sized KV buys in memory and decode speed.

    python bench/hybrid.py [--quick] [--memory-gib 16] [--decode-context 8192]

Three decoders of the same width and depth, differing only in their attention layers:
  all-global GQA  every layer full attention (16 heads, 4 KV heads, d=64)
  Cohere2 pattern 3 sliding (window 4096, interleaved RoPE) : 1 global (NoPE)
  MiMo pattern    global at layer 0 and every 6th; sliding elsewhere with window 128, 8 KV heads, sinks
Memory: KV bytes per token at 8k and 32k and how many such sequences fit in a fixed cache budget, from the
engine's own cache planner (`plan_cache`, the same split `LLM` makes). Speed: decode tokens/s of one
sequence at an 8k context through `LLM` on this CPU, after checking that the engine's greedy tokens equal
the reference generator's on a short prompt.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from common import machine, prefill_and_decode
from attnzoo.engine import LLM, GenerationConfig, SamplingParams, generate
from attnzoo.engine.cache_plan import pages_for, plan_cache
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM


def configs(hidden: int, layers: int, vocab: int, max_len: int) -> dict[str, ModelConfig]:
    base = ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                       num_layers=layers, num_heads=hidden // 64, num_kv_heads=4, head_dim=64,
                       max_position_embeddings=max_len, rope_theta=50000.0)
    cohere = replace(base, layer_types=["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)],
                     sliding_window=min(4096, max_len // 2), layer_rope={"full_attention": None}, rope_interleaved=True)
    mimo = replace(base, layer_types=["full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention"
                                      for i in range(layers)],
                   sliding_window=129, sliding_num_kv_heads=8, sliding_sinks=True)
    return {"all-global GQA": base, "Cohere2 pattern": cohere, "MiMo-V2-Flash pattern": mimo}


def memory_table(cfgs: dict[str, ModelConfig], budget: int, contexts: list[int]) -> list[str]:
    rows = ["| model | layers (global/sliding) | " + " | ".join(f"KV B/token @ {c // 1024}k | seqs @ {c // 1024}k"
                                                         for c in contexts) + " |",
            "|---|---|" + "---|---|" * len(contexts)]
    for name, cfg in cfgs.items():
        with torch.device("meta"):
            specs = DecoderLM(cfg).cache_specs()
        cells = []
        for ctx in contexts:
            plan = plan_cache(specs, 16, torch.bfloat16, budget, max_num_seqs=1024, max_num_batched_tokens=2048,
                              max_model_len=ctx)
            per_seq = sum(plan.table_bytes[w] * pages_for(w, ctx, 16) for w in plan.tables())
            cells += [f"{per_seq / ctx:,.0f}", f"{plan.max_concurrency(ctx)}"]
        n_global = cfg.layer_types.count("full_attention")
        rows.append(f"| {name} | {n_global}/{cfg.num_layers - n_global} | " + " | ".join(cells) + " |")
    return rows


def decode_speed(cfg: ModelConfig, context: int, steps: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one sequence with `context` prompt tokens."""
    torch.manual_seed(0)
    model = DecoderLM(cfg).eval()  # random weights: speed and memory do not depend on their values
    # correctness first: the engine and the reference generator agree on a short prompt
    prompt = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    want = generate(model, prompt, GenerationConfig(max_tokens=8))
    llm = LLM(model, kv_cache_memory=2 << 30, max_num_seqs=4)
    got = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    if got[0].token_ids != want:
        raise SystemExit(f"engine tokens {got[0].token_ids} != reference {want}: not timing a wrong answer")
    ids = torch.randint(0, cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(2)).tolist()
    prefill, step = prefill_and_decode(llm, ids, steps)
    return prefill, 1.0 / step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--memory-gib", type=float, default=16.0, help="cache budget for the capacity table")
    ap.add_argument("--decode-context", type=int, default=8192)
    ap.add_argument("--decode-steps", type=int, default=16)
    args = ap.parse_args(argv)
    hidden, layers, ctx, steps = (1024, 12, args.decode_context, args.decode_steps)
    if args.quick:
        hidden, layers, ctx, steps = 512, 6, 512, 4
    cfgs = configs(hidden, layers, vocab=4096, max_len=max(32768, ctx + 64))
    print(f"machine: {machine()}")
    print(f"\nKV cache of {args.memory_gib:g} GiB, bf16, hidden {hidden}, {layers} layers, 64-dim heads "
          f"(sequences that fit: the engine's planner, 1024 sequences max):\n")
    print("\n".join(memory_table(cfgs, int(args.memory_gib * 2**30), [8192, 32768])))
    print(f"\nDecode of one sequence at a {ctx}-token context, fp32, through LLM (engine == reference checked):\n")
    print("| model | prefill | decode tok/s |")
    print("|---|---|---|")
    for name, cfg in cfgs.items():
        prefill, tps = decode_speed(cfg, ctx, steps)
        print(f"| {name} | {prefill:.1f} s | {tps:.1f} |", flush=True)


if __name__ == "__main__":
    main()
