"""A live server per test module: uvicorn in a background thread on a free loopback port, over an engine
core process (SmolLM2 with a small KV cache) started for that module."""

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
from attnzoo.server.app import build_app  # noqa: E402
from attnzoo.server.core_messages import EngineConfig  # noqa: E402
from attnzoo.server.engine_client import EngineClient  # noqa: E402

KV_BYTES = 128 << 20   # ~360 pages of 16 tokens: plenty for 64 short streams, small enough to be quick
HANG_S = 120.0         # how long a test waits for an event before calling it a hang: never a speed requirement


@dataclass
class Live:
    url: str
    app: object
    engine: EngineClient


@pytest.fixture(scope="session")
def model():
    """SmolLM2 in the test process, for offline references: fp32, so compare with a core started with
    dtype="float32" (at "auto" a CPU with native bf16 serves bf16)."""
    return attnzoo.load_model("smollm2", dtype="float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_core(max_num_seqs: int = 64, dtype: str = "auto") -> EngineClient:
    return EngineClient(EngineConfig("smollm2", dict(kv_cache_memory=KV_BYTES, max_num_seqs=max_num_seqs,
                                                     dtype=dtype)))


@contextmanager
def serving(engine: EngineClient, **app_kw) -> Iterator[Live]:
    """uvicorn over `engine` until the block ends (which stops the engine core too)."""
    app = build_app(engine, "smollm2", **app_kw)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, engine)
    finally:
        server.should_exit = True
        thread.join(15)
        engine.close()


@contextmanager
def live_server(max_num_seqs: int = 64, dtype: str = "auto", **app_kw) -> Iterator[Live]:
    with serving(smollm2_core(max_num_seqs, dtype), **app_kw) as live:
        yield live


def wait_idle(live: Live, timeout: float = HANG_S) -> None:
    """Until nothing is in flight here and the core has nothing queued or running."""
    eng = live.engine
    deadline = time.monotonic() + timeout
    while eng.busy or eng.queued() or not eng.query_sync("idle"):
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.05)
    time.sleep(0.1)   # let a final step that collects aborted groups finish


def assert_no_leak(live: Live) -> None:
    wait_idle(live)
    for free, capacity in live.engine.query_sync("pages"):   # checks integrity, drops the prefix cache
        assert free == capacity, "KV pages still held after every request ended"
