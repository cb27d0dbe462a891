"""vLLM's offline engine on the throughput workload, run by bench/throughput.py with `--vllm-python` (the python of
a venv that has vllm installed: this project never installs it). Reads a JSON job on stdin: {"model": a
transformers directory (the GGUF dequantised by throughput.py), "prompts": token-id lists, "output_len": n,
"single": token ids, "single_len": n, "prefill": token ids}; prints one JSON line with output tok/s for the batch
(median of 2 after a warm-up), single-stream decode tok/s and prompt tok/s of the prefill (time to one token),
plus the load time and the greedy tokens of the first prompt (throughput.py compares them with its own)."""

from __future__ import annotations

import json
import statistics
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    from vllm import LLM, SamplingParams, TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", max_model_len=2048, max_num_seqs=max(64, len(job["prompts"])),
              seed=0, enable_prefix_caching=False, skip_tokenizer_init=True)
    load = time.perf_counter() - t0

    def run(prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t, [list(o.outputs[0].token_ids) for o in outs]

    run(job["prompts"][:2], 4)   # warm-up
    times = [run(job["prompts"], job["output_len"])[0] for _ in range(2)]
    batch = len(job["prompts"]) * job["output_len"] / statistics.median(times)
    # single stream: one request's decode rate, its first token (prefill) taken out
    t1, _ = run([job["single"]], 1)
    tn, _ = run([job["single"]], job["single_len"])
    single = (job["single_len"] - 1) / max(tn - t1, 1e-9)
    pre = min(run([p], 1)[0] for p in job["prefill"])
    _, first = run(job["prompts"][:1], 16)
    print(json.dumps({"batch": batch, "single": single, "prefill": len(job["prefill"][0]) / pre, "load": load,
                      "first": first[0]}))


if __name__ == "__main__":
    main()
