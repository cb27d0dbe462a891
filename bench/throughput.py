"""Offline throughput: attnzoo's engine vs transformers' batched `generate`, same GGUF, same run.

    python bench/throughput.py [--num-requests 32] [--min-input 64] [--max-input 256] [--output-len 128]
                               [--dtypes float32,bfloat16] [--llama-bench PATH] [--quick]
    attnzoo bench throughput ...   (the same)

nano-vllm's offline workload scaled to a 2-core CPU: N requests of random token ids with random input
lengths, a fixed number of output tokens each (EOS ignored), all submitted at once; output tokens/s.
transformers runs them as one left-padded batch. Before any speed is printed, greedy tokens of
attnzoo (fp32) must equal transformers' for one request, and each bf16 model must agree with its fp32
twin on the next-token argmax of every prompt. Single-stream decode tok/s is measured too.

A third attnzoo row keeps the GGUF's 4-bit linears quantised (int4, lm_head int8: `quantization="int4"`;
bf16 activations, which a CPU without native bf16 converts in software); two more run the file's blocks as
shipped through attnzoo's C++ kernel (`quantization="gguf"`), eagerly and with every decode step on the compiled
graph (engine/graph.py; the buckets the workload meets are compiled before the clock starts, and the compiled
step's greedy tokens must equal the eager step's first). Prefill: time to the first token
of a 1,000-token prompt. Its peer is llama.cpp on the same file: with --llama-bench (the path of a
llama-bench binary built from llama.cpp's source) its single-stream decode (tg) runs in the same sitting,
and where llama-cpp-python imports, its low-level API runs the same prompt through a Python loop
(llama_decode + argmax per token), the loop an engine would run.

--quick: 4 short requests, the float dtype "auto" picks on this CPU and gguf eager (int4 where the C++ kernels
are not built): a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import subprocess
import time

import torch
from common import auto_dtype_name, cpu_flags, machine
from generate_cpu import hf_generate, hf_stamps

import attnzoo
from attnzoo.engine import LLM, SamplingParams
from attnzoo.layers.quant import dequantize_model
from attnzoo.models.registry import resolve
from attnzoo.ops.extension import HAVE_KERNEL


def workload(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(100, 40000) for _ in range(rnd.randint(lo, hi))] for _ in range(n)]


def run_attnzoo(llm: LLM, prompts: list[list[int]], out_len: int) -> float:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True), use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.token_ids) == out_len for o in outs)
    llm.check_integrity()
    return len(prompts) * out_len / dt


@torch.inference_mode()
def run_hf(hf, prompts: list[list[int]], out_len: int, pad_id: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=out_len, min_new_tokens=out_len,
                      pad_token_id=pad_id)
    dt = time.perf_counter() - t0
    assert out.shape[1] - width == out_len
    return len(prompts) * out_len / dt


def single_stream_attnzoo(llm: LLM, prompt: list[int], n: int) -> float:
    rates = []
    for _ in range(2):
        stamps, t0 = [], time.perf_counter()
        for _ in llm.stream(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
            stamps.append(time.perf_counter() - t0)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return max(rates)


def single_stream_hf(hf, prompt: list[int], n: int) -> float:
    rates = []
    for _ in range(2):
        s = hf_stamps(hf, prompt, n)
        rates.append((len(s) - 1) / (s[-1] - s[0]))
    return max(rates)


def prefill_attnzoo(llm: LLM, n: int = 1000) -> float:
    """Prompt tokens/s: time to the first token of an n-token prompt (best of 2; a new random prompt each
    time, so the prefix cache never hits)."""
    best = float("inf")
    for seed in (1, 2):
        prompt = workload(1, n, n, seed)[0]
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
        best = min(best, time.perf_counter() - t0)
    return n / best


def llama_cpp_python_decode(gguf: str, prompt: list[int], n: int, threads: int) -> float | None:
    """Single-stream decode through llama-cpp-python: the prompt evaluated, then one `eval` (llama_decode) per
    token with a greedy argmax in Python (best of 2); None when llama_cpp does not import."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf, n_ctx=len(prompt) + n + 8, n_threads=threads, n_batch=512, verbose=False)
    best = 0.0
    for _ in range(2):
        llm.reset()
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        best = max(best, n / (time.perf_counter() - t0))
    return best


def llama_cpp_decode(binary: str, gguf: str, n: int, threads: int) -> float:
    """llama.cpp's single-stream decode tok/s on the same file (llama-bench's tg test, 3 repetitions)."""
    out = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(n), "-r", "3", "-o", "json"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    return float(json.loads(out)[0]["avg_ts"])


def vllm_offline(python: str, hf_model, prompts: list[list[int]], out_len: int, single_len: int) -> dict:
    """vLLM on the same workload (bench/vllm_offline.py in vLLM's own venv) from the GGUF dequantised to a
    transformers directory (fp32 safetensors; vLLM runs it without a tokenizer, on token ids)."""
    import os
    import tempfile
    from transformers import AutoModelForCausalLM
    cfg = copy.deepcopy(hf_model.config)   # transformers keeps a GGUF's weights packed and will not save them:
    if hasattr(cfg, "quantization_config"):   # a plain model of the same config takes the (float) state dict
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict({k: torch.as_tensor(v).float() for k, v in hf_model.state_dict().items()})
    with tempfile.TemporaryDirectory() as d:
        plain.save_pretrained(d)
        job = {"model": d, "prompts": prompts, "output_len": out_len, "single": prompts[0], "single_len": single_len,
               "prefill": workload(2, 1000, 1000, 1)}
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(torch.get_num_threads())}
        out = subprocess.run([python, os.path.join(os.path.dirname(__file__), "vllm_offline.py")], input=json.dumps(job),
                             capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise SystemExit(f"vLLM failed:\n{out.stderr[-3000:]}")
    lines = [x for x in out.stdout.splitlines() if x.startswith('{"batch"')]   # vLLM logs to stdout too
    if not lines:
        raise SystemExit(f"vLLM printed no result:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-input", type=int, default=64)
    ap.add_argument("--max-input", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama-bench", default=None, metavar="PATH", help="llama.cpp's llama-bench binary: its "
                    "single-stream decode on the same GGUF, in the same run")
    ap.add_argument("--quant", default="int4,gguf", help="comma list of the quantised rows: int4, gguf (eager and "
                    "compiled)")
    ap.add_argument("--vllm-python", default=None, metavar="PATH", help="the python of a venv with vllm installed: "
                    "vLLM's offline engine (fp32) on the same workload, in the same run (bench/vllm_offline.py)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    args = ap.parse_args(argv)
    if args.quick:  # one float dtype (the one "auto" picks on this CPU) and the int4 row
        args.num_requests, args.min_input, args.max_input, args.output_len = 4, 8, 24, 8
        args.dtypes = auto_dtype_name()
    from transformers import AutoModelForCausalLM

    print(f"# machine: {machine()}; CPU flags: {cpu_flags()}")
    path = resolve(args.model)
    prompts = workload(args.num_requests, args.min_input, args.max_input, args.seed)
    dtypes = [attnzoo.models.registry.resolve_dtype(d) for d in args.dtypes.split(",")]
    ours = {d: attnzoo.load_model(args.model, dtype=d) for d in dtypes}
    theirs = {d: AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=d).eval()
              for d in dtypes}
    fp32 = ours.get(torch.float32) or attnzoo.load_model(args.model)

    # correctness before speed
    n_check = min(16, args.output_len)
    engine = LLM(fp32, kv_cache_memory=256 << 20)
    (o,) = engine.generate([prompts[0]], SamplingParams(max_tokens=n_check, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    ref = hf_generate(theirs.get(torch.float32) or AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval(), prompts[0], n_check)
    if o.token_ids != ref:
        raise SystemExit(f"FAILED: attnzoo fp32 engine tokens {o.token_ids} != transformers {ref}; no speed reported")
    quant = args.quant.split(",") if args.quant else []
    if args.quick:   # the smoke test's time budget: one quantised row (the int4 row runs in full runs)
        quant = [q for q in quant if q != "int4"] if HAVE_KERNEL else quant
    if "int4" in quant:
        ours["int4"] = attnzoo.load_model(args.model, dtype="bfloat16", quantization="int4")
    if HAVE_KERNEL and "gguf" in quant:   # the file's blocks through attnzoo's C++ kernel, eager and on the compiled decode step
        ours["gguf"] = attnzoo.load_model(args.model, dtype="float32", quantization="gguf")
        if not args.quick:   # compiling takes minutes on 2 cores: not for a smoke test
            ours["gguf, compiled"] = ours["gguf"]
    for d, m in ours.items():
        if d is torch.float32 or d == "gguf, compiled":
            continue
        # int4 and gguf against their own weights in fp32 (random-token prompts are full of near-ties, which
        # 4-bit weights of the float model tip either way); bf16 against fp32
        ref_model = dequantize_model(copy.deepcopy(m)) if d in ("int4", "gguf") else fp32
        with torch.no_grad():
            agree = sum(int(m(torch.tensor([p]), last_only=True)[0, -1].argmax() ==
                            ref_model(torch.tensor([p]), last_only=True)[0, -1].argmax()) for p in prompts)
        if agree < 0.9 * len(prompts):
            raise SystemExit(f"FAILED: {d} next-token argmax agrees with fp32 on only {agree}/{len(prompts)} prompts")
    if "gguf, compiled" in ours:   # the compiled step gives the eager step's tokens (fp32: near-ties are rare)
        eager_llm, graph_llm = (LLM(fp32, kv_cache_memory=256 << 20, enforce_eager=e) for e in (True, False))
        graph_llm.runner.graph.compile(1)
        sp = SamplingParams(max_tokens=n_check, temperature=0, ignore_eos=True)
        a, b = ([o.token_ids for o in x.generate([prompts[0]], sp, use_tqdm=False)] for x in (eager_llm, graph_llm))
        if a != b:
            raise SystemExit(f"FAILED: compiled decode tokens {b} != eager {a}; no speed reported")
    both = " (and the compiled decode step = the eager one)" if "gguf, compiled" in ours else ""
    print(f"# correctness: attnzoo fp32 engine = transformers for {n_check} greedy tokens{both}; bf16 argmax agrees with fp32, int4's and gguf's with their own weights "
          f"dequantised to fp32, on >= 90 % of the prompts")

    pad = fp32.tokenizer.eos_token_ids[0]
    rows, hf_rates = [], {}
    for d in ours:
        if d not in dtypes and not isinstance(d, str):
            continue
        # the int4 model's float peer in transformers is its bf16 twin (transformers has no int4 CPU path here),
        # gguf's the fp32 one; --quick reuses the float model it has loaded (a GGUF load in transformers takes
        # ~30 s on 2 cores)
        peer = (dtypes[0] if args.quick else torch.bfloat16) if d == "int4" else \
            dtypes[0] if isinstance(d, str) and args.quick else torch.float32 if isinstance(d, str) else d
        tag = {"int4": "int4 (lm_head int8)", "gguf": "gguf (C++ kernel), eager",
               "gguf, compiled": "gguf (C++ kernel), compiled step"}
        name = f"{tag[d]}, vs transformers {str(peer).removeprefix('torch.')}" if d in tag else \
            str(d).replace("torch.", "")
        compiled = d == "gguf, compiled"
        llm = LLM(ours[d], kv_cache_memory=1 << 30, max_num_seqs=max(64, args.num_requests),
                  enforce_eager=not compiled)
        if compiled:   # the buckets this workload meets, compiled before any clock starts
            for rows_ in {1, 2, args.num_requests}:
                llm.runner.graph.compile(llm.runner.graph.bucket(rows_))
        run_attnzoo(llm, prompts[:2], 4)  # warm-up
        ours_tps = statistics.median(run_attnzoo(llm, prompts, args.output_len) for _ in range(2))
        if peer not in theirs:
            theirs[peer] = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=peer).eval()
        if peer not in hf_rates:
            hf_rates[peer] = (run_hf(theirs[peer], prompts, args.output_len, pad),
                              single_stream_hf(theirs[peer], prompts[0], min(64, 4 * args.output_len)))
        hf_tps, s_hf = hf_rates[peer]
        s_ours = single_stream_attnzoo(llm, prompts[0], min(64, 4 * args.output_len))
        pre = prefill_attnzoo(llm, 64 if args.quick else 1000)
        rows.append((name, ours_tps, hf_tps, s_ours, s_hf, pre))
    print(f"\n{args.num_requests} requests, input {args.min_input}-{args.max_input} random tokens, "
          f"{args.output_len} output tokens each (ignore_eos), greedy, all at once\n")
    print("| dtype | attnzoo tok/s | transformers tok/s | ratio | attnzoo 1-stream decode | transformers 1-stream | "
          "ratio | attnzoo prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, a, h, sa, sh, pre in rows:
        print(f"| {name} | {a:.0f} | {h:.0f} | {a / h:.2f}x | {sa:.1f} | {sh:.1f} | {sa / sh:.2f}x | {pre:.0f} |")
    n = min(64, 4 * args.output_len)
    mine_name, mine = max(((name, sa) for name, _, _, sa, _, _ in rows), key=lambda r: r[1])
    mine_name = mine_name.split(", vs")[0]
    loop = llama_cpp_python_decode(str(path), prompts[0], n, torch.get_num_threads())
    if loop is not None:
        print(f"\nllama.cpp through llama-cpp-python (eval + argmax per token, {torch.get_num_threads()} threads, "
              f"{path.name} as shipped): {loop:.1f} tok/s single-stream decode; attnzoo {mine_name} {mine:.1f} "
              f"({mine / loop:.2f}x)")
    if args.llama_bench:
        tg = llama_cpp_decode(args.llama_bench, str(path), n, torch.get_num_threads())
        print(f"\nllama.cpp (llama-bench tg{n}, {torch.get_num_threads()} threads, {path.name} as shipped): "
              f"{tg:.1f} tok/s single-stream decode; attnzoo {mine_name} {mine:.1f} ({mine / tg:.2f}x)")

    if args.vllm_python:
        v = vllm_offline(args.vllm_python, theirs.get(torch.float32) or AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval(), prompts, args.output_len, n)
        same = sum(a == b for a, b in zip(v["first"], o.token_ids))
        batch_name, batch = max(((name, a) for name, a, *_ in rows), key=lambda r: r[1])
        pre_name, pre = max(((name, p) for name, *_, p in rows), key=lambda r: r[1])
        print(f"\nvLLM fp32 offline (same {args.num_requests} requests, {torch.get_num_threads()} threads; loaded in "
              f"{v['load']:.0f} s; its first 16 greedy tokens of prompt 0 equal attnzoo fp32's at {same}/16): "
              f"{v['batch']:.0f} tok/s, attnzoo's best {batch:.0f} ({batch_name.split(', vs')[0]}, "
              f"{batch / v['batch']:.2f}x); single-stream {v['single']:.1f} tok/s, attnzoo {mine:.1f} "
              f"({mine / v['single']:.2f}x); 1,000-token prefill {v['prefill']:.0f} tok/s, attnzoo's best {pre:.0f} "
              f"({pre_name.split(', vs')[0]}, {pre / v['prefill']:.2f}x)")


if __name__ == "__main__":
    main()
