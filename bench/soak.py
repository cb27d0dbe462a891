"""Soak: the server under hostile load. Streams (a quarter of the clients hang up after two chunks) and
fuzzed requests (attnzoo.server.fuzz, the generator the fuzz test uses) at once, then checks that nothing
was lost, leaked or changed.

    python bench/soak.py [--streams 1000] [--concurrency 32] [--fuzz 10000] [--max-tokens 16] [--quick]
    attnzoo bench soak --base-url http://127.0.0.1:8000      # against a running server

In-process (the default) it also checks the engine: every accepted request finished, the page integrity
check holds, every page is free once the prefix cache is cleared, and the process's RSS (server and
clients) stays bounded. A fixed greedy request must give the same text before and after the load.
Targets: no 5xx, 0 lost, 0 hung, 0 pages leaked, RSS growth < 300 MB, same greedy text.

RSS growth is measured after a warm-up (the largest requests, then a tenth of the load): the first
requests fill bounded caches (a oneDNN primitive per new batch shape, the allocator's high-water of one
600k-character tokenisation), a few hundred MB once; a leak keeps growing after that."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import httpx
from common import cpu_flags
from common import machine as host

from attnzoo.server import fuzz

RSS_TARGET_MB = 300
GREEDY = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}


def machine() -> str:
    return f"{host()}; CPU flags: {cpu_flags()}"


def rss_mb(*pids: int) -> float:
    """This process and `pids` (the engine core when the server runs here)."""
    total = 0.0
    for pid in ("self", *pids):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
                break
        else:
            return float("nan")
    return total


# ---- the server, in this process ------------------------------------------------------------------
class InProcess:
    """uvicorn in a thread over an engine core process started here, so the bench can ask the engine
    afterwards (queries over the core's pipe)."""

    def __init__(self, args: argparse.Namespace):
        import uvicorn

        from attnzoo.server.app import build_app
        from attnzoo.server.core_messages import EngineConfig
        from attnzoo.server.engine_client import EngineClient
        from attnzoo.server.main import bound_kernel_caches
        bound_kernel_caches()      # as `attnzoo serve` does
        self.engine = EngineClient(EngineConfig(args.model, dict(kv_cache_memory=args.kv_cache_memory,
                                                                 max_num_seqs=args.max_num_seqs)))
        self.app = build_app(self.engine, "smollm2", model_aliases={args.model})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcess:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()

    def wait_idle(self, timeout: float) -> bool:
        eng = self.engine
        deadline = time.monotonic() + timeout
        while eng.busy or eng.queued() or not eng.query_sync("idle"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        time.sleep(0.2)      # a last step collects aborted groups
        return True

    def unfinished(self) -> int:
        """Requests the server accepted that never reached a terminal event."""
        return len(self.engine._streams) + self.engine.query_sync("groups")

    def pages_leaked(self) -> int:
        return sum(capacity - free for free, capacity in self.engine.query_sync("pages"))


# ---- load -----------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    kind: str                # done | dropped | lost | hung | rejected
    status: int | None
    detail: str = ""


async def one_stream(base: str, i: int, args: argparse.Namespace, headers: dict) -> StreamResult:
    chat = i % 2 == 0
    body = {"model": "smollm2", "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": True,
            "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Tell me about the number {i}."}]
    else:
        body["prompt"] = f"Facts about the number {i}:"
    hang_up = i % 4 == 1
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status = None
    try:
        async with asyncio.timeout(args.timeout):
            # a client per stream, so hanging up really closes the connection
            async with httpx.AsyncClient(base_url=base, timeout=args.timeout, headers=headers) as c:
                async with c.stream("POST", path, json=body) as r:
                    status = r.status_code
                    if status != 200:
                        await r.aread()
                        return StreamResult("rejected", status, r.text[:200])
                    chunks, finished, last = 0, False, ""
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        last = line[6:]
                        if last == "[DONE]":
                            break
                        event = json.loads(last)
                        if "error" in event:
                            return StreamResult("lost", status, f"error event: {last[:200]}")
                        finished |= any(ch.get("finish_reason") for ch in event.get("choices", []))
                        chunks += 1
                        if hang_up and chunks >= 2:
                            return StreamResult("dropped", status)
                    if last != "[DONE]" or not finished:
                        return StreamResult("lost", status, f"ended without a finish and [DONE]: {last[:200]}")
                    return StreamResult("done", status)
    except TimeoutError:
        return StreamResult("hung", status, f"no end within {args.timeout:.0f} s")
    except httpx.HTTPError as e:
        return StreamResult("lost", status, f"{type(e).__name__}: {e}")


async def streams(base: str, args: argparse.Namespace, headers: dict, count: int) -> list[StreamResult]:
    sem = asyncio.Semaphore(args.concurrency)

    async def limited(i: int) -> StreamResult:
        async with sem:
            return await one_stream(base, i, args, headers)
    return await asyncio.gather(*[limited(i) for i in range(count)])


async def warm_up(base: str, headers: dict) -> None:
    """One request of each largest kind (the longest text the server tokenises, a full-context prefill), so
    the RSS baseline already holds the allocator's one-time high-water and growth means accumulation."""
    async with httpx.AsyncClient(base_url=base, timeout=600, headers=headers) as c:
        ctx = (await c.get("/v1/models")).json()["data"][0]["max_model_len"]
        await c.post("/tokenize", json={"prompt": "a" * (ctx * 80)})
        await c.post("/v1/completions", json={"prompt": [1000 + i % 30000 for i in range(ctx - 8)],
                                              "max_tokens": 1})


async def greedy(base: str, headers: dict) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers) as c:
        r = await c.post("/v1/completions", json=GREEDY)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]


async def load(base: str, args: argparse.Namespace, headers: dict, num_streams: int, num_fuzz: int, seed: int):
    return await asyncio.gather(streams(base, args, headers, num_streams),
                                fuzz.run(base, fuzz.cases(seed, num_fuzz), args.fuzz_concurrency, args.timeout,
                                         headers))


# ---- the report -----------------------------------------------------------------------------------
def report(rows: list[tuple[str, str, str, bool | None]]) -> bool:
    """| check | value | target | ok |; returns whether every checked row passed."""
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    print(f"| {'check':<{w0}} | {'value':<{w1}} | {'target':<{w2}} | ok  |")
    print(f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|{'-' * (w2 + 2)}|-----|")
    for name, value, target, ok in rows:
        mark = "" if ok is None else ("yes" if ok else "NO")
        print(f"| {name:<{w0}} | {value:<{w1}} | {target:<{w2}} | {mark:<3} |")
    return all(ok is not False for _, _, _, ok in rows)


def run(args: argparse.Namespace) -> int:
    print(f"# machine: {machine()}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    local = None if args.base_url else InProcess(args)
    with local or nullcontext():
        base = args.base_url.rstrip("/") if args.base_url else local.url
        pids = [local.engine.pid] if local else []
        rss_start = rss_mb(*pids)
        before_text = asyncio.run(greedy(base, headers))
        if not args.quick:         # a full-context prefill takes tens of seconds on a small CPU
            asyncio.run(warm_up(base, headers))
        warm = asyncio.run(load(base, args, headers, args.streams // 10, args.fuzz // 10, args.seed + 1))
        rss0 = rss_mb(*pids)
        t0 = time.perf_counter()
        stream_results, fuzzed = asyncio.run(load(base, args, headers, args.streams, args.fuzz, args.seed))
        seconds = time.perf_counter() - t0
        stream_results, fuzzed = warm[0] + stream_results, warm[1] + fuzzed   # judged like the rest
        idle = local.wait_idle(args.timeout) if local else None
        unfinished = local.unfinished() if local else None
        leaked = local.pages_leaked() if local and idle else None
        after_text = asyncio.run(greedy(base, headers))
        rss1 = rss_mb(*pids)
        health = httpx.get(base + "/health", timeout=30).status_code

    kinds = Counter(r.kind for r in stream_results)
    statuses = Counter(o.status for o in fuzzed) + Counter(r.status for r in stream_results)
    five = sum(n for s, n in statuses.items() if s is not None and s >= 500)
    fuzz_bad = [o for o in fuzzed if o.problems and o.status is not None]
    fuzz_hung = [o for o in fuzzed if o.status is None]
    lost = kinds["lost"] + (unfinished or 0)
    hung = kinds["hung"] + len(fuzz_hung) + (idle is False)
    growth = rss1 - rss0
    rows = [
        ("requests", f"{args.streams} streams (c={args.concurrency}) + {args.fuzz} fuzzed (c={args.fuzz_concurrency}), "
                     f"after a warm-up of a tenth as many", "", None),
        ("duration", f"{seconds:.1f} s", "", None),
        ("streams done / hung up / rejected", f"{kinds['done']} / {kinds['dropped']} / {kinds['rejected']}", "",
         None),
        ("status counts (all requests)", ", ".join(f"{s if s is not None else 'none'}: {n}" for s, n in
                                    sorted(statuses.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))), "", None),
        ("5xx", str(five), "0", five == 0),
        ("errors outside OpenAI's envelope", str(len(fuzz_bad) - sum(o.status >= 500 for o in fuzz_bad)), "0",
         len(fuzz_bad) == sum(o.status >= 500 for o in fuzz_bad)),
        ("lost (accepted, no terminal event)", str(lost), "0", lost == 0),
        ("hung (no answer within the timeout)", str(hung), "0", hung == 0),
        ("pages leaked", "n/a (remote)" if local is None else str(leaked), "0",
         None if local is None else leaked == 0),
        ("RSS start / after warm-up / after load", "n/a (remote)" if local is None else
         f"{rss_start:.0f} / {rss0:.0f} / {rss1:.0f} MB ({growth:+.0f})", f"growth < {RSS_TARGET_MB} MB",
         None if local is None else growth < RSS_TARGET_MB),
        ("greedy text before == after", "same" if before_text == after_text else "DIFFERENT", "same",
         before_text == after_text),
        ("/health after", str(health), "200", health == 200),
    ]
    ok = report(rows)
    for o in (fuzz_bad + fuzz_hung)[:5]:
        print(f"  e.g. {fuzz.describe(o)[:300]}")
    for r in [r for r in stream_results if r.kind in ("lost", "hung")][:5]:
        print(f"  e.g. stream {r.kind}: {r.detail}")
    if before_text != after_text:
        print(f"  greedy before: {before_text!r}\n  greedy after:  {after_text!r}")
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="a running server (default: start one in this process)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="smollm2", help="for the in-process server")
    p.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="in-process KV cache bytes")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32, help="streams in flight")
    p.add_argument("--fuzz", type=int, default=10_000, help="fuzzed requests")
    p.add_argument("--fuzz-concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16, help="per stream")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request counts as hung")
    p.add_argument("--seed", type=int, default=0, help="of the fuzz generator")
    p.add_argument("--quick", action="store_true",
                   help="seconds: 24 streams, 80 fuzzed requests, no largest-request warm-up")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.streams, args.concurrency, args.fuzz, args.fuzz_concurrency, args.max_tokens = 24, 8, 80, 8, 8
        args.kv_cache_memory = min(args.kv_cache_memory, 128 << 20)
    for name in ("streams", "concurrency", "fuzz", "fuzz_concurrency", "max_tokens", "max_num_seqs"):
        if getattr(args, name) < (0 if name in ("streams", "fuzz") else 1):
            print(f"bench soak: --{name.replace('_', '-')} is out of range: {getattr(args, name)}", file=sys.stderr)
            return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
