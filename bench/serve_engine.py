"""Served vs offline throughput in one run: `LLM.generate` (1 and 32 streams, 256 in / 128 out, ignore_eos),
then `attnzoo serve` (engine core in its own process) under bench/serve.py with the issue's three
workloads, and optionally vLLM's server (VLLM_PY=/path/to/python: never installed by this script) on the
same workloads. Prints one table with served/offline ratios, the machine and its CPU flags.

    python bench/serve_engine.py                      # the full run (minutes: run it on an idle machine)
    python bench/serve_engine.py --smoke              # tiny settings: checks that the script works
    VLLM_PY=/opt/vllm/bin/python VLLM_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct python bench/serve_engine.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_flags, machine  # noqa: E402


@dataclass
class Sizes:
    input_len: int = 256
    output_len: int = 128
    prompts: int = 128
    concurrency: int = 32
    gsp_groups: int = 4
    gsp_prefix: int = 1024
    gsp_question: int = 64
    gsp_output: int = 32
    gsp_per_group: int = 16           # 4 x 16 = 64 prompts
    gsp_concurrency: int = 16
    offline_streams: int = 32


SMOKE = Sizes(input_len=32, output_len=8, prompts=4, concurrency=2, gsp_groups=2, gsp_prefix=64, gsp_question=8,
              gsp_output=4, gsp_per_group=2, gsp_concurrency=2, offline_streams=2)


def workloads(s: Sizes) -> dict[str, list[str]]:
    """bench/serve.py arguments of the issue's three workloads."""
    rnd = ["--input-len", str(s.input_len), "--output-len", str(s.output_len)]
    return {
        "a: random, c=1": rnd + ["--num-prompts", str(max(4, s.prompts // 16)), "--max-concurrency", "1"],
        f"b: random, c={s.concurrency}": rnd + ["--num-prompts", str(s.prompts), "--max-concurrency",
                                               str(s.concurrency)],
        f"c: shared prefix, c={s.gsp_concurrency}": [
            "--dataset", "generated-shared-prefix", "--gsp-num-groups", str(s.gsp_groups),
            "--gsp-prompts-per-group", str(s.gsp_per_group), "--gsp-system-prompt-len", str(s.gsp_prefix),
            "--gsp-question-len", str(s.gsp_question), "--gsp-output-len", str(s.gsp_output),
            "--max-concurrency", str(s.gsp_concurrency)],
    }


def offline(model: str, s: Sizes) -> dict[str, float]:
    """Output tokens/s of LLM.generate for 1 stream and for `offline_streams` streams."""
    from attnzoo.engine import LLM, SamplingParams
    llm = LLM(model, max_num_seqs=max(64, s.offline_streams))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=s.output_len, temperature=0, ignore_eos=True)
    out = {}
    for streams in (1, s.offline_streams):
        prompts = [[rng.randrange(1000, 32000) for _ in range(s.input_len)] for _ in range(streams)]
        llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)   # warm up
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        out[f"offline {streams} stream{'s' * (streams > 1)}"] = streams * s.output_len / (time.perf_counter() - t)
    llm.close()
    return out


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited (code {proc.returncode})")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def served(cmd: list[str], port: int, s: Sizes, tmp: Path) -> dict[str, dict]:
    """Start a server, run every workload with bench/serve.py, stop it."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url, proc)
        results = {}
        for name, extra in workloads(s).items():
            f = tmp / f"{port}-{name[0]}.json"
            subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--base-url", url, "--seed", "0",
                            "--result-file", str(f), *extra], check=True, stdout=subprocess.DEVNULL)
            results[name] = json.loads(f.read_text())
        return results
    finally:
        proc.terminate()
        proc.wait(60)


def table(off: dict[str, float], systems: dict[str, dict[str, dict]], s: Sizes) -> str:
    ref = {"a": off["offline 1 stream"], "b": off[f"offline {s.offline_streams} streams"]}
    lines = [f"machine: {machine()}", f"CPU flags: {cpu_flags()}", "",
             "| system | workload | output tok/s | served/offline | mean TTFT ms | mean TPOT ms | failed |",
             "|---|---|---|---|---|---|---|"]
    for name, tps in off.items():
        lines.append(f"| LLM.generate | {name}, {s.input_len} in / {s.output_len} out | {tps:.1f} | | | | |")
    for system, results in systems.items():
        for wl, r in results.items():
            ratio = f"{r['output_throughput'] / ref[wl[0]]:.2f}" if wl[0] in ref else "-"
            lines.append(f"| {system} | {wl} | {r['output_throughput']:.1f} | {ratio} | {r['mean_ttft_ms']:.0f} | "
                         f"{r['mean_tpot_ms']:.1f} | {r.get('failed', 0)} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--port", type=int, default=8111)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script (figures mean nothing)")
    args = p.parse_args()
    s = SMOKE if args.smoke else Sizes()
    off = offline(args.model, s)
    systems = {}
    with tempfile.TemporaryDirectory() as tmp:
        systems["attnzoo serve"] = served(
            [sys.executable, "-m", "attnzoo.cli", "serve", "--model", args.model, "--port", str(args.port),
             "--log-level", "warning", "--max-num-seqs", str(max(64, s.concurrency))], args.port, s, Path(tmp))
        if vllm := os.environ.get("VLLM_PY"):
            model = os.environ.get("VLLM_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
            systems["vLLM"] = served([vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                                      "--served-model-name", args.model, "--port", str(args.port + 1)],
                                     args.port + 1, s, Path(tmp))
    print(table(off, systems, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
