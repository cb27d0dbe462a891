"""Tensor parallelism's overhead: per-step time and the share of it spent in the collectives, TP 1 vs TP 2.

    python bench/tp.py [--hidden 512] [--layers 4] [--seqs 8] [--tokens 32] [--device cpu|cuda]

A random llama-shaped checkpoint (transformers, saved to a temporary directory) is served by `LLM` with
tensor_parallel_size 1 and 2 (gloo on the CPU, nccl on CUDA when >= 2 GPUs). First the check: TP 2's greedy
tokens must equal TP 1's (fp32), else no speed is printed. Then, per size, the median decode-step time of
`--seqs` sequences and the share of rank 0's step spent inside all-reduce / all-gather (which includes waiting
for the slower rank). On one CPU the ranks share the cores, so TP 2 is slower there: this measures overhead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_flags, machine

from attnzoo import LLM, SamplingParams, distributed


def checkpoint(path: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(2, hidden // 256), head_dim=64,
                      max_position_embeddings=1024, initializer_range=0.05)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def measure(path: Path, tp: int, prompts: list[list[int]], tokens: int, device: str) -> tuple[list, float, float]:
    """(greedy tokens, median decode-step seconds, collective share of those steps on rank 0)."""
    with LLM(path, dtype="float32", device=device, tensor_parallel_size=tp, kv_cache_memory=256 << 20,
             enable_prefix_caching=False) as llm:
        greedy = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)   # warm-up
        for p in prompts:
            llm.add_request(p, greedy)
        llm.step()                                    # the prefill step: not timed
        times, comm = [], []
        out: dict[str, list[int]] = {}
        while llm.has_unfinished():
            distributed.COMM.enabled, distributed.COMM.seconds = True, 0.0
            t0 = time.perf_counter()
            for o in llm.step():
                if o.finished:
                    out[o.request_id] = o.token_ids
            times.append(time.perf_counter() - t0)
            comm.append(distributed.COMM.seconds)
        distributed.COMM.enabled = False
    i = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    return [out[k] for k in sorted(out, key=int)], statistics.median(times), comm[i] / times[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("TP 2 on CUDA needs 2 GPUs; this machine has " f"{torch.cuda.device_count()}")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 8192, (n,), generator=g).tolist() for n in range(20, 20 + 7 * args.seqs, 7)]
    with tempfile.TemporaryDirectory() as d:
        path = checkpoint(Path(d), args.hidden, args.layers)
        rows = {tp: measure(path, tp, prompts, args.tokens, args.device) for tp in (1, 2)}
    print(f"machine: {machine()}\ncpu flags: {cpu_flags()}\nbackend: {distributed.backend_for(args.device)}")
    print(f"model: llama-shaped, hidden {args.hidden}, {args.layers} layers, {args.hidden // 64} heads, vocab 8192, "
          f"fp32; {args.seqs} sequences, {args.tokens} greedy tokens each")
    same = rows[1][0] == rows[2][0]
    print(f"check: TP 2 greedy tokens == TP 1: {'PASS' if same else 'FAIL'}")
    if not same:
        raise SystemExit("correctness check failed: no speeds reported")
    print("\n| TP | decode step (median) | collectives on rank 0 | vs TP 1 |\n|---|---|---|---|")
    for tp, (_, step, share) in rows.items():
        print(f"| {tp} | {step * 1e3:.1f} ms | {share:.0%} | {step / rows[1][1]:.2f}x |")


if __name__ == "__main__":
    main()
