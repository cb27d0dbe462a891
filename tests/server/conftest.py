"""A live server per test module: uvicorn in a background thread on a free loopback port, over one shared
SmolLM2 (loaded once per session) with a small KV cache."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import attnzoo  # noqa: E402
from attnzoo.engine import LLM  # noqa: E402
from attnzoo.server.app import build_app  # noqa: E402

KV_BYTES = 128 << 20   # ~360 pages of 16 tokens: plenty for 64 short streams, small enough to be quick


@dataclass
class Live:
    url: str
    app: object
    llm: LLM


@pytest.fixture(scope="session")
def model():
    return attnzoo.load_model("smollm2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model, **app_kw) -> Iterator[Live]:
    llm = LLM(model, kv_cache_memory=KV_BYTES, max_num_seqs=app_kw.pop("max_num_seqs", 64))
    app = build_app(llm, "smollm2", **app_kw)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, llm)
    finally:
        server.should_exit = True
        thread.join(15)


def wait_idle(live: Live, timeout: float = 30.0) -> None:
    """Until the engine thread has nothing queued, running or in its inbox."""
    eng = live.app.state.server.engine
    deadline = time.monotonic() + timeout
    while eng.busy or eng.queued() or live.llm.has_unfinished():
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.05)
    time.sleep(0.1)   # let a final step that collects aborted groups finish


def assert_no_leak(live: Live) -> None:
    wait_idle(live)
    llm = live.llm
    llm.check_integrity()
    llm.clear_prefix_cache()
    for g in llm.kv.groups:
        assert g.pool.num_free == g.pool.capacity, "KV pages still held after every request ended"
