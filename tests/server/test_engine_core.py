"""The engine core in its own process: served greedy outputs equal offline `LLM` outputs, RequestOutput for
RequestOutput (stop strings, applied in the API process by the same assembler, included); one step message
carries every request's tokens; aborts and stop strings reach the core; a killed core fails /health and
in-flight streams; no core outlives its API process. Plus the step loop itself, run in a thread over a pipe."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import pytest
import torch

from attnzoo.engine import LLM, SamplingParams
from attnzoo.engine.outputs import OutputAssembler, RequestOutput
from attnzoo.server import engine_client
from attnzoo.server.core_messages import AddRequest, EngineConfig, Query, Shutdown, StepOutput
from attnzoo.server.engine_client import EngineClient
from attnzoo.server.engine_core import EngineCore
from tests.server.conftest import HANG_S, KV_BYTES, assert_no_leak, live_server, serving, smollm2_core, wait_idle

PROMPTS = ["The capital of France is", "List the days of the week: Monday, Tuesday,", "Once upon a time"]


@pytest.fixture(scope="module")
def live():
    # fp32 like the offline `model` fixture: at "auto" a CPU with native bf16 would serve bf16
    with live_server(dtype="float32") as s:
        yield s


def complete(live, **body) -> dict:
    r = httpx.post(live.url + "/v1/completions", json={"model": "smollm2", **body}, timeout=HANG_S)
    assert r.status_code == 200, r.text
    return r.json()


def core_finishes(live, monkeypatch) -> dict[str, tuple[str | None, int]]:
    """Filled as the core reports: request id -> (finish reason, tokens generated) of its first completion, as
    the core sent them (before the API process, which may already have ended the request, drops them)."""
    seen: dict[str, tuple[str | None, int]] = {}
    real = live.engine._on_step

    def spy(msg: StepOutput) -> None:
        for g in msg.outputs:
            for d in g.seqs:
                if d.index == 0:
                    reason, n = seen.get(g.request_id, (None, 0))
                    seen[g.request_id] = (d.finish_reason or reason, n + len(d.token_ids))
        real(msg)
    monkeypatch.setattr(live.engine, "_on_step", spy)
    return seen


def served_outputs(monkeypatch) -> dict[str, RequestOutput]:
    """Filled as the API process assembles: request id -> its latest `RequestOutput` (before it becomes JSON)."""
    latest: dict[str, RequestOutput] = {}

    class Recording(OutputAssembler):
        def snapshot(self, *args) -> RequestOutput:
            latest[self.request_id] = out = super().snapshot(*args)
            return out
    monkeypatch.setattr(engine_client, "OutputAssembler", Recording)
    return latest


def completions(out: RequestOutput) -> list[tuple]:
    return [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs]


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing and holds no memory)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_greedy_outputs_equal_offline(live, model, monkeypatch):
    assert model.embed_tokens.weight.dtype == torch.float32    # as the `live` core (dtype="float32")
    llm = LLM(model, kv_cache_memory=KV_BYTES)
    assembled = served_outputs(monkeypatch)
    for prompt in PROMPTS:
        offline = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
        served = complete(live, prompt=prompt, max_tokens=16, temperature=0, logprobs=0)["choices"][0]
        assert served["text"] == offline.text and served["finish_reason"] == offline.finish_reason
        assert len(served["logprobs"]["tokens"]) == len(offline.token_ids)
        (out,) = assembled.values()
        assert completions(out) == completions(offline)
        assembled.clear()
        # a stop string inside the greedy answer, in n = 2 completions: the API process stops each where the
        # engine would (at the token that completes it)
        stop = offline.text.split()[2][:3]
        offline = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0, stop=[stop], n=2),
                               use_tqdm=False)[0]
        served = complete(live, prompt=prompt, max_tokens=16, temperature=0, stop=[stop], n=2)["choices"][0]
        assert (served["text"], served["finish_reason"], served["stop_reason"]) == \
            (offline.text, "stop", stop) == (offline.text, offline.finish_reason, offline.outputs[0].stop_reason)
        (out,) = assembled.values()
        assert completions(out) == completions(offline) and len(out.outputs) == 2
        assembled.clear()


def test_one_step_message_carries_several_requests(live, monkeypatch):
    eng, seen = live.engine, []
    real = eng._on_step
    monkeypatch.setattr(eng, "_on_step", lambda msg: (seen.append(msg), real(msg)))

    async def go():
        async with httpx.AsyncClient(base_url=live.url, timeout=HANG_S) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json={
                "prompt": f"Count to {i}:", "max_tokens": 8, "ignore_eos": True, "temperature": 0}) for i in range(4)])
    assert all(r.status_code == 200 for r in asyncio.run(go()))
    assert all(isinstance(m, StepOutput) for m in seen)
    per_message = [sum(1 for g in m.outputs if any(s.token_ids for s in g.seqs)) for m in seen]
    assert max(per_message) >= 2, per_message
    assert len(seen) < 4 * 8            # not one message per token per request


def test_a_disconnect_aborts_in_the_core_and_frees_pages(live, monkeypatch):
    core = core_finishes(live, monkeypatch)
    body = {"prompt": "Write a long essay about rivers.", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=HANG_S) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events >= 3:
                break
    wait_idle(live)
    # the core ended it as aborted (at max_tokens it would say "length"), and freed its pages
    ((reason, n),) = core.values()
    assert reason == "abort" and n < 1000, (reason, n)
    assert_no_leak(live)


def test_a_stop_string_ends_the_request_in_the_core(live, monkeypatch):
    full = complete(live, prompt=PROMPTS[1], max_tokens=8, temperature=0)["choices"][0]["text"]
    stop = full.split()[1][:2]
    core = core_finishes(live, monkeypatch)
    r = complete(live, prompt=PROMPTS[1], max_tokens=1500, temperature=0, ignore_eos=True, stop=[stop])
    assert r["choices"][0]["finish_reason"] == "stop"
    wait_idle(live)
    # the API process met the stop string and told the core to abort: no 1500 tokens behind our back
    ((reason, n),) = core.values()
    assert reason == "abort" and n < 1500, (reason, n)
    assert_no_leak(live)
    metrics = httpx.get(live.url + "/metrics", timeout=HANG_S).text
    assert 'finished_reason="stop"' in metrics


@pytest.fixture
def tiny_model(tmp_path: Path) -> str:
    pytest.importorskip("transformers")
    from tests.engine.test_tp import _llama
    return str(_llama(tmp_path / "llama"))


def tiny_core(path: str) -> EngineClient:
    return EngineClient(EngineConfig(path, dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20,
                                                page_size=4, max_num_seqs=4)))


def test_a_killed_core_fails_health_and_streams():
    # its own SmolLM2 core (slow enough that 1000 tokens cannot finish before the kill)
    with serving(smollm2_core()) as live:
        body = {"prompt": "Write a long essay about rivers.", "max_tokens": 1000, "ignore_eos": True,
                "stream": True}
        assert httpx.get(live.url + "/health", timeout=HANG_S).status_code == 200
        lines = []
        # the stream ends (HANG_S: a hang guard) with the engine's death as its last event
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=HANG_S) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 2:
                        os.kill(live.engine.pid, signal.SIGKILL)
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "engine_dead"
        r = httpx.get(live.url + "/health", timeout=HANG_S)
        assert r.status_code == 503 and "exit code -9" in r.text
        r = httpx.post(live.url + "/v1/completions", json={**body, "stream": False}, timeout=HANG_S)
        assert r.status_code == 503
    assert gone(live.engine.pid)


def test_closing_the_server_stops_the_core(tiny_model):
    with serving(tiny_core(tiny_model)) as live:
        pid = live.engine.pid
        assert not gone(pid)
    assert gone(pid)


def test_the_core_exits_with_its_api_process(tiny_model):
    script = (f"from attnzoo.server.engine_client import EngineClient\n"
              f"from attnzoo.server.core_messages import EngineConfig\n"
              f"e = EngineClient(EngineConfig({tiny_model!r}, dict(dtype='float32', device='cpu', "
              f"kv_cache_memory=4 << 20, page_size=4)))\n"
              f"print(e.pid, flush=True)\n"
              f"import time; time.sleep(600)\n")
    api = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        core = int(api.stdout.readline())
        assert not gone(core)
    finally:
        api.kill()
        api.wait()
    deadline = time.monotonic() + HANG_S       # the core notices at once; this only bounds a hang
    while not gone(core):
        assert time.monotonic() < deadline, "the core outlived its API process"
        time.sleep(0.05)


# ---- the step loop in a thread ------------------------------------------------------------------------------
def recv(conn: Connection):
    assert conn.poll(HANG_S), "the step loop sent nothing"     # a hang guard, not a speed
    return conn.recv()


def test_the_loop_survives_an_add_that_raises(monkeypatch):
    from tests.engine.test_kv_memory import tiny
    llm = LLM(tiny(), kv_cache_memory=1 << 20, page_size=4)
    ours, theirs = mp.Pipe()
    loop = threading.Thread(target=EngineCore(llm, theirs).run, daemon=True)
    loop.start()

    def broken(*a, **kw):
        raise OverflowError("a bug in add_request")
    monkeypatch.setattr(llm, "add_request", broken)
    ours.send([AddRequest("a", [1, 2, 3], SamplingParams(max_tokens=3))])
    msg = recv(ours)
    assert msg.rejected == [("a", "OverflowError", "a bug in add_request")] and not msg.outputs
    monkeypatch.undo()
    ours.send([AddRequest("b", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
               AddRequest("c", [4, 5], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))])
    tokens: dict[str, list[int]] = {"b": [], "c": []}
    while not all(len(t) == 3 for t in tokens.values()):
        msg = recv(ours)
        for g in msg.outputs:
            tokens[g.request_id] += g.seqs[0].token_ids if g.seqs else []
    assert msg.stats.running == 0
    ours.send([Query(7, "idle")])
    assert recv(ours).value is True
    ours.send([Shutdown()])
    loop.join(HANG_S)
    assert not loop.is_alive()
    # only once the loop has stopped: the engine is not shared between threads
    want = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    assert [tokens["b"], tokens["c"]] == [o.token_ids for o in want]
    assert not loop.is_alive()
