"""What quantised weights do to the default model's answers: greedy chat answers side by side.

    python bench/quant_answers.py [--model smollm2] [--tokens 32] [--no-llama-cpp] [--variants "int4;int8"] [--quick]
    attnzoo bench quant_answers ...   (the same)

Every variant answers the same chat prompts (greedy, up to --tokens tokens, stopping at EOS) through the
engine, one stream; llama.cpp (llama-cpp-python, when importable) answers the same token ids from the same
GGUF file in the same run. Variants:
- fp32 / bf16: the file dequantised to float (what `quantization="none"` runs);
- int4: `quantization="int4"` (the file's 4-bit codes, scales and zeros in bf16, bf16 activations, lm_head
  int8 per row requantised from the file's Q8_0 embedding);
- int4 dequantised: the same int4 codes and bf16 scales dequantised into fp32 linears, fp32 activations
  (isolates the quantised weights from the kernels and the activations' dtype);
- int4 + fp32 act: the int4 kernel with fp32 scales/zeros and fp32 activations;
- int4, float lm_head: int4 linears with the file's own lm_head (Q8_0 dequantised) in bf16;
- int8: `quantization="int8"` (every linear requantised to int8 per row, bf16 activations);
- gguf: `quantization="gguf"` (the file's blocks as shipped through attnzoo's C++ kernel, 8-bit activations per
  block: llama.cpp's scheme), fp32 elsewhere; "gguf, compiled" the same model with every decode step on the
  compiled graph (engine/graph.py). The other variants run eagerly.
Columns: the answer, and how many leading tokens it shares with the fp32 answer and with llama.cpp's.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import cpu_flags, machine

import attnzoo
from attnzoo import LLM, SamplingParams
from attnzoo.layers.quant import dequantize_model, quantize_model
from attnzoo.ops.extension import HAVE_KERNEL

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly.",
             "Why is the sky blue?", "Write a short story about a robot who learns to paint."]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def answer(model, prompts: list[list[int]], n: int, eos: list[int], compiled: bool = False
           ) -> tuple[list[list[int]], float]:
    """compiled: every decode step on the compiled graph (compiled before the clock starts), else eager."""
    llm = LLM(model, max_num_seqs=1, enable_prefix_caching=False, enforce_eager=not compiled)
    if compiled:
        llm.runner.graph.compile(1)
    sp = SamplingParams(max_tokens=n, temperature=0, stop_token_ids=eos)
    t0 = time.perf_counter()
    outs = [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    return outs, time.perf_counter() - t0


def forced_logits(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Next-token logits [T, V] (fp32) of each whole sequence in one forward pass: every variant scored on
    the same (fp32) answers, so one early near-tie does not decide the rest of the comparison."""
    return [model(torch.tensor([s]))[0].float() for s in seqs]


def llama_cpp_logits(path: str, seqs: list[list[int]]) -> list[torch.Tensor] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=512, n_threads=torch.get_num_threads(), logits_all=True, verbose=False)
    out = []
    for s in seqs:
        llm.reset()
        llm.eval(s)
        out.append(torch.from_numpy(llm.scores[: len(s)].copy()).float())
    return out


def llama_cpp_answers(path: str, prompts: list[list[int]], n: int, eos: list[int]) -> list[list[int]] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    outs = []
    for p in prompts:
        llm.reset()
        got: list[int] = []
        for t in llm.generate(p, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t in eos or len(got) >= n:
                break
            got.append(t)
        outs.append(got)
    return outs


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--variants", default=None, help="semicolon-separated subset of the variants (fp32 always runs)")
    ap.add_argument("--quick", action="store_true", help="4 tokens, three variants: a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.variants = 4, "int4;int4 dequantised (fp32)"
    from attnzoo.models.registry import resolve
    path = resolve(args.model)
    print(f"# quant_answers: {path.name}, greedy chat answers, up to {args.tokens} tokens")
    print(f"machine: {machine()}; CPU flags: {cpu_flags()}; {time.strftime('%Y-%m-%d')}\n")

    fp32 = attnzoo.load_model(args.model, dtype="float32")
    tok = fp32.tokenizer
    eos = list(tok.eos_token_ids)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    int4 = attnzoo.load_model(args.model, dtype="bfloat16", quantization="int4")
    gguf = attnzoo.load_model(args.model, dtype="float32", quantization="gguf") if HAVE_KERNEL else None

    def quantized(act: torch.dtype, **kw) -> torch.nn.Module:
        m = copy.deepcopy(fp32)
        quantize_model(m, "int4", dtype=act, **kw)
        return m

    variants = {   # built only when run (--variants picks a few)
        "fp32": lambda: fp32,
        "bf16": lambda: copy.deepcopy(fp32).to(torch.bfloat16),
        "int4": lambda: int4,
        # fp32 residual stream, norms, attention and KV; bf16 only into matmuls
        "int4, fp32 model": lambda: quantized(torch.bfloat16),
        "int4 dequantised (fp32)": lambda: dequantize_model(int4),
        "int4 + fp32 act": lambda: quantized(torch.float32),
        "int4, float lm_head": lambda: quantized(torch.bfloat16, overrides={"lm_head": None}).to(torch.bfloat16),
        "int8": lambda: attnzoo.load_model(args.model, dtype="bfloat16", quantization="int8"),
        "gguf": lambda: gguf,
        "gguf, compiled": lambda: gguf,
    }
    if args.variants:
        keep = {"fp32", *args.variants.split(";")}
        variants = {k: v for k, v in variants.items() if k in keep}
    answers, secs, forced = {}, {}, {}
    for label, make in variants.items():
        model = make()
        if model is None:
            continue   # gguf without the C++ kernels
        answers[label], secs[label] = answer(model, prompts, args.tokens, eos, compiled=label.endswith("compiled"))
        if label == "fp32":
            seqs = [p + a for p, a in zip(prompts, answers["fp32"])]
        forced[label] = forced_logits(model, seqs)
        print(f"- {label}: {secs[label]:.1f} s for {len(prompts)} answers", flush=True)
    ll = None if args.no_llama_cpp else llama_cpp_answers(str(path), prompts, args.tokens, eos)
    if ll is not None:
        answers["llama.cpp (Q4_1 as shipped)"] = ll
        forced["llama.cpp (Q4_1 as shipped)"] = llama_cpp_logits(str(path), seqs)
    else:
        print("- llama.cpp: not run (llama_cpp not importable or --no-llama-cpp)")

    print("\n| prompt | variant | tokens = fp32 | tokens = llama.cpp | answer |")
    print("|---|---|---|---|---|")
    totals = {k: [0, 0] for k in answers}
    for i, q in enumerate(QUESTIONS):
        for label, outs in answers.items():
            a = outs[i]
            f = common_prefix(a, answers["fp32"][i])
            lc = common_prefix(a, ll[i]) if ll is not None else None
            totals[label][0] += f
            totals[label][1] += lc or 0
            text = tok.decode(a).replace("\n", "\\n").replace("|", "\\|")
            print(f"| {q if label == 'fp32' else ''} | {label} | {f}/{len(a)} | {'-' if lc is None else lc} | "
                  f"{text} |")
    print("\nLeading tokens shared, summed over the prompts; then every variant fed the fp32 answers (teacher "
          "forcing) and scored at the answer positions: how often its top token is fp32's, and its logits' "
          "relative L2 distance from fp32's (mean over positions).\n")
    print("| variant | shared with fp32 | shared with llama.cpp | forced: top-1 = fp32 | forced: logit rel. L2 |")
    print("|---|---|---|---|---|")
    for label, (f, lc) in totals.items():
        agree = total = 0
        errs = []
        for p, got, ref in zip(prompts, forced[label], forced["fp32"]):
            g, r = got[len(p) - 1:-1], ref[len(p) - 1:-1]
            agree += (g.argmax(-1) == r.argmax(-1)).sum().item()
            total += len(r)
            errs += ((g - r).norm(dim=-1) / r.norm(dim=-1)).tolist()
        print(f"| {label} | {f} | {lc if ll is not None else '-'} | {agree}/{total} | {sum(errs) / len(errs):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
