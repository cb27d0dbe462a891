"""vLLM's offline engine on bench/structured.py's workload, run by it in vLLM's own venv (this project never installs
vllm). Reads a JSON job on stdin: {"model": a transformers directory with its tokenizer (the GGUF dequantised by
structured.py), "prompts": token-id lists, "schemas": a JSON schema or null per prompt, "max_tokens", "temperature",
"seeds", "repeats", "backend": vLLM's structured-outputs backend ("auto" is its default), "compact": no whitespace
between JSON tokens (attnzoo's JSON grammars are compact; vLLM's default allows any)}. Runs the "free" arm (no
constraints) and the "mixed" arm (each prompt with a schema constrained by it) `repeats` times each, alternating,
after a warm-up that compiles every schema; prints one JSON line: median output tok/s per arm, the mixed arm's texts
and finish reasons of its last run (structured.py validates them), both arms' tokens per request in their last
run, the backend vLLM picked, vLLM's version and the load time."""

from __future__ import annotations

import json
import statistics
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype="float32", max_model_len=2048, max_num_seqs=max(64, len(job["prompts"])),
              seed=0, enable_prefix_caching=False, structured_outputs_config={"backend": job["backend"]})
    load = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]

    def params(constrained: bool, max_tokens: int) -> list:
        return [SamplingParams(max_tokens=max_tokens, temperature=job["temperature"], seed=seed,
                               structured_outputs=StructuredOutputsParams(
                                   json=s, disable_any_whitespace=job["compact"]) if constrained and s else None)
                for s, seed in zip(job["schemas"], job["seeds"])]

    def run(arm: str, max_tokens: int = job["max_tokens"]) -> tuple[float, list]:
        ps = params(arm == "mixed", max_tokens)
        t = time.perf_counter()
        outs = llm.generate(prompts, ps, use_tqdm=False)
        dt = time.perf_counter() - t
        if arm == "mixed":   # vLLM writes the backend it picked into the params
            run.backend = next(p.structured_outputs._backend for p in ps if p.structured_outputs)
        done = [o.outputs[0] for o in outs]
        return sum(len(c.token_ids) for c in done) / dt, done

    run("mixed", 2)   # warm-up: every schema compiled, cached by the backend
    rates: dict[str, list[float]] = {"free": [], "mixed": []}
    last: dict[str, list] = {}
    for r in range(job["repeats"]):
        for arm in ("free", "mixed") if r % 2 == 0 else ("mixed", "free"):
            rate, last[arm] = run(arm)
            rates[arm].append(rate)
    print(json.dumps({"free": statistics.median(rates["free"]), "mixed": statistics.median(rates["mixed"]),
                      "texts": [c.text for c in last["mixed"]], "finish": [c.finish_reason for c in last["mixed"]],
                      "tokens": {a: [len(c.token_ids) for c in cs] for a, cs in last.items()},
                      "backend": run.backend, "load": load, "version": vllm.__version__}))


if __name__ == "__main__":
    main()
