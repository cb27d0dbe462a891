"""The server over a tensor-parallel engine: a worker that dies turns /health into 503 engine_dead and a
request then fails with an error instead of hanging."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from fastapi.testclient import TestClient  # noqa: E402

from attnzoo.engine import LLM  # noqa: E402
from attnzoo.server.app import build_app  # noqa: E402

from tests.engine.test_tp import _llama  # noqa: E402


def test_dead_worker_shows_on_health_and_fails_requests(tmp_path: Path) -> None:
    llm = LLM(_llama(tmp_path / "llama"), dtype="float32", device="cpu", tensor_parallel_size=2,
              kv_cache_memory=4 << 20, page_size=4, max_num_seqs=4)
    try:
        with TestClient(build_app(llm, "tiny")) as client:
            assert client.get("/health").status_code == 200
            body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
            worker = llm.tp.procs[0]
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)
            r = client.get("/health")
            assert r.status_code == 503 and "rank 1" in r.text
            assert client.post("/v1/completions", json=body).status_code >= 500
    finally:
        llm.close()
    assert not any(p.is_alive() for p in llm.tp.procs)
