"""Load generator for any OpenAI-compatible server, after vLLM's `bench serve`.

    python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 16 --input-len 64 --output-len 32
    attnzoo bench serve --dataset generated-shared-prefix --gsp-num-groups 2 --gsp-prompts-per-group 4

Streams every request, measures TTFT (first non-empty delta), ITL (between later deltas), TPOT and E2E
with time.perf_counter, and reports them under vLLM's JSON field names so results are comparable. It only
needs httpx: no torch, no tokenizer, so it runs against vLLM or SGLang unchanged."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

# Common words that are one token with a leading space in most BPE vocabularies: prompts of ~N tokens
# without needing the server's tokenizer.
WORDS = ("the of and to in is was for on as with by at from that this which it be are or an not have has "
         "had but one all can were there their more when will would who so if out up about into them some "
         "could time these two may then do first any my now such like our over man me even most made after "
         "also did many before must through back years where much your way well down should because each "
         "just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off "
         "come since against go came right used take three").split()


@dataclass
class Prompt:
    prompt: str | list[int]
    input_len: int          # what we aimed for; the server's usage count is reported when it sends one
    output_len: int


@dataclass
class Result:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""


# ---- datasets -------------------------------------------------------------------------------------
def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_dataset(args: argparse.Namespace, rng: random.Random) -> list[Prompt]:
    """Exact-length random token ids for completions (as vLLM's `random`); words for chat."""
    out = []
    for _ in range(args.num_prompts):
        lo = max(1, int(args.input_len * (1 - args.range_ratio)))
        n = rng.randint(lo, max(lo, int(args.input_len * (1 + args.range_ratio))))
        m_lo = max(1, int(args.output_len * (1 - args.range_ratio)))
        m = rng.randint(m_lo, max(m_lo, int(args.output_len * (1 + args.range_ratio))))
        if args.backend == "openai" and args.random_prompt == "ids":
            # skip the low ids, where special and control tokens usually live
            prompt: str | list[int] = [rng.randrange(1000, args.random_vocab_size) for _ in range(n)]
        else:
            prompt = _words(rng, n)
        out.append(Prompt(prompt, n, m))
    return out


def shared_prefix_dataset(args: argparse.Namespace, rng: random.Random) -> list[Prompt]:
    """groups x prompts, each group sharing one long system prompt (SGLang's generated-shared-prefix)."""
    out = []
    for _ in range(args.gsp_num_groups):
        system = _words(rng, args.gsp_system_prompt_len)
        for _ in range(args.gsp_prompts_per_group):
            question = _words(rng, args.gsp_question_len)
            out.append(Prompt(f"{system}\n\nQuestion: {question}\nAnswer:",
                              args.gsp_system_prompt_len + args.gsp_question_len, args.gsp_output_len))
    rng.shuffle(out)
    return out


# ---- one request ----------------------------------------------------------------------------------
def _payload(args: argparse.Namespace, model: str, p: Prompt) -> dict:
    body = {"model": model, "max_tokens": p.output_len, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True     # vLLM / SGLang / attnzoo extension: exact output lengths
    if args.backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": p.prompt}]
    else:
        body["prompt"] = p.prompt
    return body


def _delta_text(chunk: dict) -> str:
    parts = []
    for c in chunk.get("choices") or []:
        parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(parts)


async def send(client: httpx.AsyncClient, url: str, headers: dict, body: dict, p: Prompt) -> Result:
    r = Result(prompt_len=p.input_len)
    chunks = 0
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    r.success = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = str(chunk["error"])
                    return r
                if chunk.get("usage"):
                    u = chunk["usage"]
                    r.output_tokens = u.get("completion_tokens", 0)
                    r.prompt_len = u.get("prompt_tokens", r.prompt_len)
                    r.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                text = _delta_text(chunk)
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last, chunks = now, chunks + 1
                    r.text += text
        r.latency = time.perf_counter() - t0
        r.output_tokens = r.output_tokens or chunks     # no usage chunk: one token per delta, as a fallback
        if r.success and chunks == 0:
            r.success, r.error = False, "no content was streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


# ---- the run --------------------------------------------------------------------------------------
async def arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yield request indices at Poisson (burstiness 1) or Gamma-distributed gaps; rate inf = all at once."""
    for i in range(n):
        yield i
        if math.isfinite(rate) and rate > 0 and i < n - 1:
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


async def discover_model(client: httpx.AsyncClient, base: str, headers: dict) -> str:
    resp = await client.get(f"{base}/v1/models", headers=headers)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = (random_dataset if args.dataset == "random" else shared_prefix_dataset)(args, rng)
    base = args.base_url.rstrip("/")
    endpoint = args.endpoint or ("/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        model = args.model or await discover_model(client, base, headers)
        url = base + endpoint
        for w in range(args.num_warmups):
            warm = await send(client, url, headers, _payload(args, model, prompts[w % len(prompts)]),
                              prompts[w % len(prompts)])
            if not warm.success:
                raise RuntimeError(f"warmup request failed: {warm.error}")
        sem = asyncio.Semaphore(args.max_concurrency or len(prompts))

        async def limited(p: Prompt) -> Result:
            async with sem:
                return await send(client, url, headers, _payload(args, model, p), p)

        tasks = []
        start = time.perf_counter()
        async for i in arrivals(len(prompts), args.request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(limited(prompts[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, results, duration)


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict:
    ms = [v * 1000 for v in values_s] or [0.0]
    out = {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
           f"std_{name}_ms": statistics.pstdev(ms)}
    srt = sorted(ms)
    for p in percentiles:
        k = min(len(srt) - 1, max(0, math.ceil(p / 100 * len(srt)) - 1))   # nearest-rank percentile
        out[f"p{p:g}_{name}_ms"] = srt[k]
    return out


def summarize(args: argparse.Namespace, model: str, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.success]
    inp = sum(r.prompt_len for r in ok)
    outp = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    pct = [float(x) for x in args.metric_percentiles.split(",")]
    res = {"backend": args.backend, "model_id": model, "dataset": args.dataset, "num_prompts": len(results),
           "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
           "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "duration": duration,
           "completed": len(ok), "failed": len(results) - len(ok), "total_input_tokens": inp,
           "total_output_tokens": outp, "total_cached_tokens": sum(r.cached_tokens for r in ok),
           "request_throughput": len(ok) / duration, "output_throughput": outp / duration,
           "total_token_throughput": (inp + outp) / duration}
    res |= _stats("ttft", [r.ttft for r in ok], pct)
    res |= _stats("tpot", tpots, pct)
    res |= _stats("itl", [x for r in ok for x in r.itl], pct)
    res |= _stats("e2el", [r.latency for r in ok], pct)
    res |= {"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "errors": [r.error for r in results]}
    return res


def print_table(res: dict, pct: list[str]) -> None:
    rows = [("Successful requests:", res["completed"]), ("Failed requests:", res["failed"]),
            ("Maximum request concurrency:", res["max_concurrency"]),
            ("Benchmark duration (s):", f"{res['duration']:.2f}"),
            ("Total input tokens:", res["total_input_tokens"]), ("Total generated tokens:", res["total_output_tokens"]),
            ("Total cached prompt tokens:", res["total_cached_tokens"]),
            ("Request throughput (req/s):", f"{res['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{res['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{res['total_token_throughput']:.2f}")]
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    for k, v in rows:
        print(f"{k:<40}{v!s:>10}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print("{s:{c}^50}".format(s=f" {title} ", c="-"))
        for stat in ["mean", "median", *[f"p{p}" for p in pct]]:
            label = f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {name.upper()} (ms):"
            print(f"{label:<40}{res[f'{stat}_{name}_ms']:>10.2f}")
    print("=" * 50)
    errs = [e for e in res["errors"] if e]
    if errs:
        print(f"first error: {errs[0]}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default=None, help="default /v1/completions, or /v1/chat/completions for chat")
    p.add_argument("--backend", choices=["openai", "openai-chat"], default="openai")
    p.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", "--dataset-name", dest="dataset", choices=["random", "generated-shared-prefix"],
                   default="random")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=64)
    p.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=32)
    p.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float, default=0.0)
    p.add_argument("--random-vocab-size", type=int, default=32000, help="random token ids are drawn below this")
    p.add_argument("--random-prompt", choices=["ids", "text"], default="ids",
                   help="random prompts as token ids (vLLM's way) or as words, for servers that take only text")
    p.add_argument("--gsp-num-groups", type=int, default=2)
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=256)
    p.add_argument("--gsp-question-len", type=int, default=32)
    p.add_argument("--gsp-output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of the gaps; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly the output length (default on)")
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request before it fails")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="write the results (with per-request details) as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dataset == "generated-shared-prefix":
        args.num_prompts = args.gsp_num_groups * args.gsp_prompts_per_group
    if args.num_prompts < 1:
        print("bench serve: --num-prompts must be >= 1", file=sys.stderr)
        return 2
    try:
        res = asyncio.run(run(args))
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"bench serve: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print_table(res, [p.strip() for p in args.metric_percentiles.split(",")])
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
