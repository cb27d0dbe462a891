"""Speculative decoding (n-gram drafts) on the default model: single-stream tokens/s with and without drafting on
a copy-heavy workload and on free writing, and 32 concurrent requests; llama.cpp's prompt lookup in the same run.

    python bench/speculative.py [--max-tokens 128] [--k 4] [--quant auto,none,gguf] [--no-compiled] [--quick]

Workloads (chat-templated, greedy, the model's own EOS ends an answer):
- copy: repeat a code block, edit a paragraph (one word swapped throughout), fix a typo and print the whole code;
- free: a story, an explanation, a list of ideas (nothing to copy: drafts are rare and mostly rejected).
Each prompt runs alone (single stream); tokens/s is the answer's tokens over the wall time of the whole request.
Rows: each weight format the default model loads as (quantization "auto" picks int4 for one sequence on the CPU,
"none" is float, "gguf" the file's blocks through attnzoo's C++ kernel), eager, and gguf with its decode step
compiled (engine/graph.py; compiled before the clock; verify steps run on the same graph, in the buckets above
one row). 32 concurrent:
the six prompts, numbered, 32 requests at once (quantization "auto" gives float weights for batches).

Correctness first, before any speed: every token a drafted run emits must be the target's greedy choice given the
tokens before it (one teacher-forced forward per answer); with fp32 weights the answers must also equal the
plain run's token for token. bf16 activations (the int4 row) and 8-bit activations (gguf) round differently in a
verify chunk than in a decode row, so there a choice within 0.5 logits of the top may differ from the plain
run's and the answers part after it (the table counts the answers that stayed equal). Peer: llama-cpp-python's `LlamaPromptLookupDecoding` (llama.cpp's prompt
lookup drafts) against its plain greedy loop on the same file and prompts, where llama_cpp imports.

--quick: one prompt per workload, 24 tokens, the auto row only: a smoke test.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import cpu_flags, machine

from attnzoo.engine import LLM, SamplingParams
from attnzoo.models.registry import resolve
from attnzoo.ops.extension import HAVE_KERNEL

CODE = '''def merge_intervals(intervals):
    """Merge overlapping intervals given as (start, end) pairs."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = [intervals[0]]
    for start, end in intervals[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged'''

PARAGRAPH = ("The cat sat by the window every morning, watching the street below. When the baker opened his shop, "
             "the cat would stretch, yawn and walk down the stairs to wait by the door. The baker always saved a "
             "small piece of bread for the cat, and the cat always pretended not to care.")

COPY = [f"Repeat the following Python function exactly, with no changes and no explanation:\n\n```python\n{CODE}\n```",
        f"Rewrite this paragraph, replacing the word 'cat' with 'dog' everywhere, and change nothing else:\n\n{PARAGRAPH}",
        "Fix the typo in this code and print the whole corrected function:\n\n```python\n"
        + CODE.replace("merged.append", "merged.apend") + "\n```"]
FREE = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain to a ten-year-old why the sky is blue.",
        "Give five ideas for a weekend trip, two sentences each."]


def chat_ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def single_stream(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], float]:
    """(tokens/s over all prompts run one after another, the answers, mean tokens per verify step)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    llm.generate(prompts[0][:16], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)   # warm-up
    before = (llm.spec_stats.drafted, llm.spec_stats.accepted, len(llm.spec_stats.lengths))
    answers, tokens, t0 = [], 0, time.perf_counter()
    for p in prompts:
        (out,) = llm.generate([p], params, use_tqdm=False)
        answers.append(out.token_ids)
        tokens += len(out.token_ids)
    dt = time.perf_counter() - t0
    verifies = len(llm.spec_stats.lengths) - before[2]
    accepted = llm.spec_stats.accepted - before[1]
    llm.spec_stats.lengths.clear()
    llm.check_integrity()
    return tokens / dt, answers, (accepted + verifies) / verifies if verifies else float("nan")


@torch.inference_mode()
def off_greedy(llm: LLM, prompt: list[int], answer: list[int], tol: float) -> int:
    """Tokens of `answer` that are not the target's greedy choice given what precedes them (teacher-forced, one
    full forward), beyond a top-2 logit gap of `tol` (bf16 and quantised weights round differently in a verify
    chunk than in a decode row, so a near-tie may go either way; fp32 runs use tol 0 and must agree)."""
    if not answer:
        return 0
    logits = llm.model(torch.tensor([prompt + answer]))[0, len(prompt) - 1: -1].float()
    top2 = logits.topk(2, -1).values
    picked = logits.gather(-1, torch.tensor(answer)[:, None])[:, 0]
    return int(((picked < top2[:, 0]) & (top2[:, 0] - picked > tol)).sum())


def concurrent(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    llm.check_integrity()
    return sum(len(o.token_ids) for o in outs) / dt, [o.token_ids for o in outs]


def llama_cpp_lookup(gguf: str, prompts: list[list[int]], max_tokens: int, k: int, eos: list[int]
                     ) -> tuple[float, float] | None:
    """llama-cpp-python greedy, single stream: (plain tok/s, with LlamaPromptLookupDecoding tok/s)."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return None
    rates = []
    for draft in (None, LlamaPromptLookupDecoding(num_pred_tokens=k, max_ngram_size=4)):
        llm = Llama(model_path=gguf, n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False,
                    draft_model=draft)
        tokens, t0 = 0, time.perf_counter()
        for p in prompts:
            llm.reset()
            for n, tok in enumerate(llm.generate(p, temp=0.0, top_k=1, reset=True)):
                if tok in eos or n >= max_tokens:
                    break
                tokens += 1
        rates.append(tokens / (time.perf_counter() - t0))
    return rates[0], rates[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens (prompt_lookup 2-4)")
    ap.add_argument("--quant", default="auto,none,gguf", help="comma list of quantization values to run single-stream")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled-step gguf rows (minutes to compile)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.max_tokens, args.quant, args.no_compiled = 24, "auto", True
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    print(f"# machine: {machine()}; CPU flags: {cpu_flags()}")
    print(f"# n-gram drafts: {spec}; greedy, up to {args.max_tokens} tokens per answer, EOS ends an answer")
    workloads = {"copy": COPY[:1] if args.quick else COPY, "free": FREE[:1] if args.quick else FREE}
    tok = LLM(args.model, max_num_seqs=1, enforce_eager=True)   # renders the prompts (tokenizer, chat template)
    ids = {w: [chat_ids(tok, t) for t in texts] for w, texts in workloads.items()}
    rows = []
    quants = [q for q in args.quant.split(",") if q != "gguf" or HAVE_KERNEL]
    configs = [(q, False) for q in quants] + ([("gguf", True)] if HAVE_KERNEL and not args.no_compiled else [])
    for quant, compiled in configs:
        name = f"{quant}{', compiled step' if compiled else ', eager'}"
        res = {}
        for drafting in (False, True):
            llm = LLM(args.model, max_num_seqs=1, quantization=quant, enforce_eager=not compiled,
                      speculative_config=spec if drafting else None)
            if compiled:   # the decode bucket, and with drafts the shared graph of the verify steps' buckets
                for size in llm.runner.graph.sizes[:2]:
                    llm.runner.graph.compile(size)
            res[drafting] = {w: single_stream(llm, ps, args.max_tokens) for w, ps in ids.items()}
        exact = llm.model.embed_tokens.weight.dtype == torch.float32 and quant == "none"
        for w in workloads:
            base, fast = res[False][w], res[True][w]
            same = sum(a == b for a, b in zip(base[1], fast[1]))
            off = sum(off_greedy(llm, p, a, 0.0 if exact else 0.5) for p, a in zip(ids[w], fast[1]))
            if off or (exact and same < len(base[1])):
                raise SystemExit(f"FAILED: {name} {w}: {off} drafted-run tokens are not the target's greedy choice "
                                 f"({same}/{len(base[1])} answers equal the plain run's); no speed")
            rows.append((name, w, base[0], fast[0], fast[2], sum(map(len, base[1])), f"{same}/{len(base[1])}"))
    print("\nsingle stream (each prompt alone)\n")
    print("| weights | workload | plain tok/s | n-gram tok/s | speed-up | tokens per verify | answer tokens | "
          "answers = plain |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w, a, b, acc, n, same in rows:
        print(f"| {name} | {w} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {acc:.2f} | {n} | {same} |")

    if not args.quick:
        texts = COPY + FREE
        batch = [chat_ids(tok, f"({i}) " + texts[i % 6]) for i in range(32)]
        got = {}
        for drafting in (False, True):
            llm = LLM(args.model, max_num_seqs=32, enforce_eager=True, speculative_config=spec if drafting else None)
            got[drafting] = concurrent(llm, batch, args.max_tokens)
        same = sum(x == y for x, y in zip(got[False][1], got[True][1]))
        # fp32, but batches of different shapes round differently: a near-tie (1e-3) may go either way
        off = sum(off_greedy(llm, p, t, 1e-3) for p, t in zip(batch, got[True][1]))
        if off:
            raise SystemExit(f"FAILED: 32 concurrent: {off} drafted-run tokens are not the target's greedy choice")
        a, b = got[False][0], got[True][0]
        print(f"\n32 concurrent requests (the six prompts, numbered; quantization auto = float for batches, eager; "
              f"{same}/32 answers equal the plain run's): plain {a:.1f} tok/s, n-gram {b:.1f} tok/s ({b / a:.2f}x)")

    peer = llama_cpp_lookup(str(resolve(args.model)), ids["copy"] + ids["free"], args.max_tokens, args.k,
                            tok.eos_token_ids) if not args.quick else None
    if peer is not None:
        print(f"\nllama.cpp (llama-cpp-python, same file, same six prompts one at a time, greedy, "
              f"{torch.get_num_threads()} threads): plain {peer[0]:.1f} tok/s, prompt lookup (k={args.k}, "
              f"n-gram <= 4) {peer[1]:.1f} tok/s ({peer[1] / peer[0]:.2f}x)")


if __name__ == "__main__":
    main()
