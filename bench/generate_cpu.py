"""Single-stream generation on the CPU: attnzoo vs transformers on the same GGUF, in one run.

    python bench/generate_cpu.py [--model smollm2] [--new-tokens 128] [--prompt-tokens 1000] [--quick]

Both run fp32 weights dequantised from the same file, greedy, EOS ignored. First the two must produce
the same greedy tokens; only then are speeds reported. Every generated token is timestamped as it is
produced (transformers through a streamer): TTFT is the first stamp, decode tok/s = (N-1) / (last - first).
Medians of 3 runs; the machine is noisy, so compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine

import attnzoo
from attnzoo.engine import GenerationConfig, generate, stream_generate
from attnzoo.models.registry import resolve


def ours_stamps(model, ids: list[int], n: int) -> list[float]:
    t0, stamps = time.perf_counter(), []
    for _ in stream_generate(model, ids, GenerationConfig(max_tokens=n)):
        stamps.append(time.perf_counter() - t0)
    return stamps


class _Stamper:
    """transformers streamer protocol: put() gets the prompt once, then each new token."""

    def __init__(self) -> None:
        self.t0, self.stamps, self.seen_prompt = time.perf_counter(), [], False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.stamps.append(time.perf_counter() - self.t0)
        self.seen_prompt = True

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_generate(model, ids: list[int], n: int, streamer=None) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, streamer=streamer)
    return out[0, len(ids):].tolist()


def hf_stamps(model, ids: list[int], n: int) -> list[float]:
    s = _Stamper()
    hf_generate(model, ids, n, s)
    return s.stamps


def speeds(stamps_fn, short: list[int], long: list[int], n: int, runs: int = 3) -> tuple[float, float, float]:
    """(decode tok/s, TTFT short, TTFT long): medians over `runs` runs after a warm-up."""
    stamps_fn(short, 2)
    done = [stamps_fn(short, n) for _ in range(runs)]
    decode = statistics.median((len(r) - 1) / (r[-1] - r[0]) for r in done)
    ttft = statistics.median(r[0] for r in done)
    pre = statistics.median(stamps_fn(long, 1)[0] for _ in range(runs))
    return decode, ttft, pre


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="length of the long prompt for prefill speed")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.prompt_tokens = 8, 64
    from transformers import AutoModelForCausalLM

    print(f"# machine: {machine()}")
    t0 = time.perf_counter()
    ours = attnzoo.load_model(args.model)
    t_ours = time.perf_counter() - t0
    path = resolve(args.model)
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    t_hf = time.perf_counter() - t0
    tok = ours.tokenizer
    short = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]))
    filler = tok.encode(" ".join(["The history of attention in neural networks is long and winding."] * 200))
    long = filler[: args.prompt_tokens]

    # correctness before speed: identical greedy tokens (transformers forced past EOS like ours)
    check_n = min(16, args.new_tokens)
    a = generate(ours, short, GenerationConfig(max_tokens=check_n))
    b = hf_generate(hf, short, check_n)
    if a != b:
        raise SystemExit(f"FAILED: greedy tokens differ, ours {a} vs transformers {b}; no speed reported")
    print(f"# correctness: {check_n} greedy tokens identical to transformers")

    rows = []
    for name, model, fn in (("attnzoo", ours, ours_stamps), ("transformers", hf, hf_stamps)):
        decode, ttft, prefill = speeds(lambda ids, n: fn(model, ids, n), short, long, args.new_tokens,
                                       1 if args.quick else 3)
        rows.append((name, decode, ttft, len(long) / prefill, prefill))
    print(f"\nmodel {args.model} ({path.name}), fp32, greedy, {len(short)}-token chat prompt, "
          f"{args.new_tokens} new tokens; prefill of {len(long)} tokens. Load: attnzoo {t_ours:.1f} s, "
          f"transformers {t_hf:.1f} s\n")
    print("| system | decode tok/s | TTFT short prompt | prompt tok/s | TTFT long prompt |")
    print("|---|---|---|---|---|")
    for name, decode, ttft, ptps, pre in rows:
        print(f"| {name} | {decode:.1f} | {ttft:.3f} s | {ptps:.0f} | {pre:.2f} s |")
    print(f"\nattnzoo / transformers: decode {rows[0][1] / rows[1][1]:.2f}x, prefill {rows[0][3] / rows[1][3]:.2f}x")


if __name__ == "__main__":
    main()
