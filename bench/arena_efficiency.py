"""Efficiency of every arena contestant through the serving engine: prefill time and per-token decode time
against context length (1k to 32k), cache bytes per token, and cache bytes each decode step reads (where
sparse attention pays off: NSA, DSA, MSA read a bounded number of tokens).

The models are the recall grid's (attnzoo/arena/grid.py: width `--width`, 2 layers, hybrids at their
pattern's depth, sparse sizes scaled from the cell's training length), with random weights: speed does not
depend on their values. Correctness first: for each model, the engine's greedy tokens on a short prompt
must equal the reference generator's (no cache manager, no scheduler). Peer: torch SDPA is what GQA's
softmax layers already run on; the peer row is transformers' Llama at GQA's shape with its own KV cache
(prefill and decode through `generate`), at the contexts where it fits the time cap.

    python bench/arena_efficiency.py                    # every mechanism, 1k..32k
    python bench/arena_efficiency.py --quick            # two mechanisms, 1k (CI smoke)
    python bench/arena_efficiency.py --json docs/arena/efficiency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, machine, markdown, prefill_and_decode  # noqa: E402

from attnzoo.arena.costs import kv_bytes_per_token, kv_read_bytes_per_token  # noqa: E402
from attnzoo.arena.grid import grid_from  # noqa: E402
from attnzoo.arena.mechanisms import MECHANISMS, parse_mechanisms  # noqa: E402
from attnzoo.engine import LLM, GenerationConfig, SamplingParams, generate  # noqa: E402
from attnzoo.models.decoder import DecoderLM  # noqa: E402


def model_for(mech: str, width: int, cell: tuple[int, int], max_len: int) -> DecoderLM:
    g = grid_from("cpu", [mech], f"{cell[0]}x{cell[1]}", str(width))
    rc = g.recall(mech, cell, width, g.lrs[0])
    cfg = replace(MECHANISMS[mech](rc.shape()), max_position_embeddings=max_len, vocab_size=4096)
    torch.manual_seed(0)
    return DecoderLM(cfg).eval()


def check(model: DecoderLM) -> None:
    prompt = torch.randint(0, 4096, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    want = generate(model, prompt, GenerationConfig(max_tokens=8))
    llm = LLM(model, kv_cache_memory=64 << 20, max_num_seqs=2, enable_prefix_caching=False)
    got = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    if got[0].token_ids != want:
        raise SystemExit(f"{model.config.name}: engine tokens {got[0].token_ids} != reference {want}")


def timed(model: DecoderLM, context: int, steps: int) -> tuple[float, float]:
    """(prefill seconds, median decode seconds per token) of one sequence of `context` prompt tokens."""
    llm = LLM(model, kv_cache_memory=int(2.5 * kv_bytes_per_token(model.config, context) * context * 2) + (256 << 20),
              max_num_seqs=1, enable_prefix_caching=False, max_num_batched_tokens=4096)
    ids = torch.randint(0, 4096, (context,), generator=torch.Generator().manual_seed(2)).tolist()
    return prefill_and_decode(llm, ids, steps)


def peer(model: DecoderLM, context: int, steps: int) -> tuple[float, float] | None:
    """transformers' Llama at this GQA model's shape: (prefill s, decode s/token), or None without it."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                      head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                                      attn_implementation="sdpa")).eval()
    ids = torch.randint(0, c.vocab_size, (1, context), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = hf(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        past, tok, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            t = time.perf_counter()
            out = hf(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return prefill, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", default="all")
    p.add_argument("--contexts", default="1024,4096,16384,32768")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--cell", default="128x8", help="the grid cell whose models (sparse sizes) are timed")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per context (median)")
    p.add_argument("--cap", type=float, default=60.0, help="skip a mechanism's longer contexts once its next prefill "
                                                          "could take longer than this many seconds (if quadratic)")
    p.add_argument("--json", help="also write the figures here (the grid report's trade-off plot reads them)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    names = parse_mechanisms("gqa,gdn" if a.quick else a.mechanisms)
    contexts = [1024] if a.quick else [int(c) for c in a.contexts.split(",")]
    cell = tuple(int(v) for v in a.cell.split("x"))
    rows, out = [], {}
    print(f"# arena efficiency through the engine ({time.strftime('%Y-%m-%d')})\n\nmachine: {machine()}\n"
          f"cpu flags: {cpu_flags()}\nmodels: the recall grid's at cell {a.cell}, width {a.width}, fp32, random "
          f"weights, vocabulary 4096; one sequence; prefill in 4096-token chunks; decode: median of {a.steps} steps. "
          f"Cache bytes: bf16 KV, fp32 recurrent state (the cost model's). Engine == reference checked per model.\n",
          flush=True)
    for mech in names + (["llama (transformers, GQA shape)"] if not a.quick else []):
        is_peer = mech.startswith("llama")
        model = model_for("gqa" if is_peer else mech, a.width, cell, max(contexts) + 64)
        if not is_peer:
            check(model)
        out[mech] = {}
        for ctx in contexts:
            got = peer(model, ctx, a.steps) if is_peer else timed(model, ctx, a.steps)
            if got is None:
                break
            pre, dec = got
            row = {"mechanism": mech, "context": ctx, "prefill (s)": pre, "prefill tok/s": ctx / pre,
                   "decode ms/token": 1000 * dec}
            if not is_peer:
                row |= {"cache B/token": kv_bytes_per_token(model.config, ctx),
                        "cache KiB read/step": kv_read_bytes_per_token(model.config, ctx) / 1024}
            rows.append(row)
            out[mech][str(ctx)] = {k: v for k, v in row.items() if k not in ("mechanism", "context")}
            print(f"{mech} @ {ctx}: prefill {pre:.2f} s, decode {1000 * dec:.1f} ms/token", file=sys.stderr, flush=True)
            nxt = next((c for c in contexts if c > ctx), None)
            if nxt is not None and pre * (nxt / ctx) ** 2 > a.cap:   # quadratic prefill: the next one may not end
                print(f"{mech}: contexts above {ctx} skipped (prefill {pre:.1f} s, --cap {a.cap:g} s)", file=sys.stderr)
                break
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "cpu_flags": cpu_flags(), "date":
                                            time.strftime("%Y-%m-%d"), "cell": a.cell, "width": a.width,
                                            "runs": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
