"""32 concurrent streams, a quarter of which hang up mid-stream, plus non-streaming clients that time out:
every surviving stream ends with [DONE], and afterwards no KV page is held."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server.conftest import assert_no_leak, live_server

N_CLIENTS = 32


@pytest.fixture(scope="module")
def live():
    with live_server() as s:
        yield s


async def _stream(url: str, i: int, drop: bool) -> str:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
            "max_tokens": 12, "temperature": 1.0, "ignore_eos": True, "stream": True}
    # one client per stream, so leaving the block really closes the connection
    async with httpx.AsyncClient(timeout=120) as c:
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = 0
            last = ""
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    last = line
                    if drop and events >= 3:
                        return "dropped"
            return last


def test_concurrent_streams_with_disconnects(live):
    async def go():
        return await asyncio.gather(*[_stream(live.url, i, drop=i % 4 == 0) for i in range(N_CLIENTS)])
    results = asyncio.run(go())
    assert results.count("dropped") == N_CLIENTS // 4
    assert all(r == "data: [DONE]" for r in results if r != "dropped")
    assert_no_leak(live)
    metrics = httpx.get(live.url + "/metrics").text
    aborted = [ln for ln in metrics.splitlines()
               if ln.startswith("attnzoo:request_success_total") and 'finished_reason="abort"' in ln]
    assert aborted and float(aborted[0].split()[-1]) >= 1


def test_non_streaming_client_timeout_aborts(live):
    async def go():
        body = {"prompt": "Write a long essay about rivers.", "max_tokens": 2000, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=0.5) as c:
            with pytest.raises(httpx.TimeoutException):
                await c.post(live.url + "/v1/completions", json=body)
    asyncio.run(go())
    assert_no_leak(live)   # would take minutes (or fail) if the 2000-token request kept running
