"""Hostile bodies on every endpoint (attnzoo.server.fuzz, shared with `attnzoo bench soak`): never a 5xx,
every error in OpenAI's envelope, /health answering throughout, memory bounded, no page leaked."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import pytest

from attnzoo.server import fuzz
from tests.server.conftest import assert_no_leak, live_server

N_CASES = 300
RSS_GROWTH_MB = 300   # ~50 MB in practice (allocator high-water, shape caches); an unbounded n grows by GBs


@pytest.fixture(scope="module")
def live():
    with live_server() as s:
        yield s


def rss_mb(pid: int | str = "self") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def both_rss_mb(live) -> float:
    """The API process (this one) and the engine core."""
    return rss_mb() + rss_mb(live.engine.pid)


async def _health_poll(url: str, stop: asyncio.Event) -> list[int | None]:
    codes: list[int | None] = []
    async with httpx.AsyncClient(timeout=10) as c:
        while not stop.is_set():
            try:
                codes.append((await c.get(url + "/health")).status_code)
            except httpx.HTTPError:
                codes.append(None)
            await asyncio.sleep(0.2)
    return codes


def test_fuzz_never_5xx(live):
    seed = random.randrange(2**32)    # fresh cases each run; the seed is in the failure message
    todo = list(fuzz.cases(seed, N_CASES))
    httpx.post(live.url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 2})
    before = both_rss_mb(live)

    async def go():
        stop = asyncio.Event()
        health = asyncio.create_task(_health_poll(live.url, stop))
        outcomes = await fuzz.run(live.url, todo, concurrency=8, timeout=60)
        stop.set()
        return outcomes, await health
    outcomes, health = asyncio.run(go())
    growth = both_rss_mb(live) - before

    bad = [fuzz.describe(o) for o in outcomes if o.problems]
    assert not bad, f"seed {seed}: {len(bad)} bad answers, e.g.\n" + "\n".join(bad[:10])
    statuses = Counter(o.status for o in outcomes)
    # the generator reaches both sides of the boundary and the transport-level errors
    assert statuses[200] >= 10 and statuses[400] >= N_CASES // 3, (seed, statuses)
    assert health and set(health) == {200}, (seed, Counter(health))
    assert growth < RSS_GROWTH_MB, f"seed {seed}: RSS grew by {growth:.0f} MB"
    assert_no_leak(live)


def test_fuzz_cases_are_reproducible_and_varied():
    a, b = list(fuzz.cases(7, 200)), list(fuzz.cases(7, 200))
    assert [(c.path, c.body, c.headers) for c in a] == [(c.path, c.body, c.headers) for c in b]
    assert len({c.path for c in a}) >= 6 and len({c.body for c in a}) > 120
    assert any(c.body and b"\\ud" in c.body.lower() for c in a)            # lone-surrogate escapes
    assert any(c.body and b"\xff" in c.body for c in a)                     # invalid UTF-8


@pytest.mark.parametrize("status,ctype,content,ok", [
    (500, "application/json", b'{"error": {"message": "x", "type": "t", "param": null, "code": null}}', False),
    (400, "application/json", b'{"error": {"message": "x", "type": "t", "param": null, "code": null}}', True),
    (400, "application/json", b'{"detail": "x"}', False),
    (400, "text/plain", b"Bad Request", False),
    (200, "text/event-stream", b"data: {}\n\ndata: [DONE]\n\n", True),
    (200, "text/event-stream", b'data: {}\n\ndata: {"error": {}}\n\ndata: [DONE]\n\n', False),
    (200, "text/event-stream", b"data: {}\n\n", False),
])
def test_the_judge_can_fail(status, ctype, content, ok):
    assert (fuzz.check(status, ctype, content) == []) is ok
