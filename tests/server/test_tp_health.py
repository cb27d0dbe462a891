"""The server over a tensor-parallel engine core (the core is rank 0 and starts the workers): a worker that
dies turns /health into 503 engine_dead and a request then fails with an error instead of hanging; closing
the server stops the core and its workers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from fastapi.testclient import TestClient  # noqa: E402

from attnzoo.server.app import build_app  # noqa: E402
from attnzoo.server.core_messages import EngineConfig  # noqa: E402
from attnzoo.server.engine_client import EngineClient  # noqa: E402

from tests.engine.test_tp import HANG_GUARD_S, _llama  # noqa: E402


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_dead_worker_shows_on_health_and_fails_requests(tmp_path: Path) -> None:
    engine = EngineClient(EngineConfig(str(_llama(tmp_path / "llama")), dict(
        dtype="float32", device="cpu", tensor_parallel_size=2, kv_cache_memory=4 << 20, page_size=4,
        max_num_seqs=4)))
    (worker,) = engine.info.worker_pids
    try:
        with TestClient(build_app(engine, "tiny")) as client:
            assert client.get("/health").status_code == 200
            body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
            os.kill(worker, signal.SIGKILL)
            # the core notices at once (it waits on the workers' sentinels); /health turns when the message lands.
            # The deadline only guards against a hang: a loaded machine may take a while
            deadline = time.monotonic() + HANG_GUARD_S
            while (r := client.get("/health")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert r.status_code == 503 and "rank 1" in r.text
            assert client.post("/v1/completions", json=body).status_code >= 500
    finally:
        engine.close()
    assert not engine.alive and gone(engine.pid) and gone(worker)
