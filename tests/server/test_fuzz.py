"""Hostile bodies on every endpoint (attnzoo.server.fuzz, shared with `attnzoo bench soak`): never a 5xx,
every error in OpenAI's envelope, /health answering throughout, memory bounded, no page leaked. Fixed seeds,
so a failure replays (`--fuzz-seed N` runs any other); together they exercise every hostile class."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from attnzoo.server import fuzz
from tests.server.conftest import HANG_S, assert_no_leak, live_server

CI_SEEDS = (0, 1, 2)   # checked below to exercise every class in fuzz.CLASSES
N_CASES = 100          # per seed
RSS_GROWTH_MB = 300    # ~50 MB in practice (allocator high-water, shape caches); an unbounded n grows by GBs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        seeds = metafunc.config.getoption("--fuzz-seed") or CI_SEEDS
        metafunc.parametrize("seed", seeds, ids=[f"seed={s}" for s in seeds])


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
    # HANG_S exceeds the server's own 60 s stall verdict on /health: its answer decides, not our timeout
    async with httpx.AsyncClient(timeout=HANG_S) as c:
        while not stop.is_set():
            try:
                codes.append((await c.get(url + "/health")).status_code)
            except httpx.HTTPError:
                codes.append(None)
            await asyncio.sleep(0.2)
    return codes


def test_fuzz_never_5xx(live, seed: int):
    todo = list(fuzz.cases(seed, N_CASES))
    replay = f"seed {seed} (replay: pytest tests/server/test_fuzz.py --fuzz-seed {seed})"
    httpx.post(live.url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 2}, timeout=HANG_S)
    before = both_rss_mb(live)

    async def go():
        stop = asyncio.Event()
        health = asyncio.create_task(_health_poll(live.url, stop))
        outcomes = await fuzz.run(live.url, todo, concurrency=8, timeout=HANG_S)
        stop.set()
        return outcomes, await health
    outcomes, health = asyncio.run(go())
    growth = both_rss_mb(live) - before

    bad = [fuzz.describe(o) for o in outcomes if o.problems]
    assert not bad, f"{replay}: {len(bad)} bad answers, e.g.\n" + "\n".join(bad[:10])
    statuses = Counter(o.status for o in outcomes)
    # the generator reaches both sides of the boundary and the transport-level errors
    assert statuses[200] >= N_CASES // 10 and statuses[400] >= N_CASES // 3, (replay, statuses)
    assert health and set(health) == {200}, (replay, Counter(health))
    assert growth < RSS_GROWTH_MB, f"{replay}: RSS grew by {growth:.0f} MB"
    assert_no_leak(live)


def test_the_ci_seeds_exercise_every_hostile_class():
    # exactly what test_fuzz_never_5xx sends in CI: the cases are a function of the seed
    sent = [c for seed in CI_SEEDS for c in fuzz.cases(seed, N_CASES)]
    seen = Counter(t for c in sent for t in c.tags)
    assert set(seen) <= set(fuzz.CLASSES), set(seen) - set(fuzz.CLASSES)
    assert all(seen[k] for k in fuzz.CLASSES), f"never exercised: {[k for k in fuzz.CLASSES if not seen[k]]}"
    assert sum(not c.tags for c in sent) >= 10      # and valid requests, for the other side of the boundary


@pytest.mark.parametrize("path,body,tags", [
    ("/v1/completions", {"model": "smollm2", "prompt": "Hello", "max_tokens": 2, "stop": ["a"]}, set()),
    ("/v1/completions", {"prompt": "\ud800", "n": "2"}, {"lone-surrogate", "wrong-type"}),
    ("/v1/chat/completions", {"messages": [], "logprobs": 1, "top_p": fuzz.Raw("NaN")},
     {"wrong-type", "non-finite-number"}),
    ("/tokenize", {"model": "m", "x": fuzz.Raw("[" * 50 + "]" * 50), "seed": 10**30},
     {"missing-field", "deep-nesting", "huge-number"}),
    ("/detokenize", {"tokens": list(range(300)), "model": None}, {"long-value"}),
])
def test_tags_say_what_a_body_holds(path, body, tags):
    # hand-made bodies: the coverage check above counts with this classifier
    assert fuzz.field_tags(path, body, edited=body) == tags


def test_fuzz_cases_are_reproducible_and_varied():
    a, b = list(fuzz.cases(7, 200)), list(fuzz.cases(7, 200))
    assert [(c.path, c.body, c.headers, c.tags) for c in a] == [(c.path, c.body, c.headers, c.tags) for c in b]
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
