"""The engine in one background thread, so `LLM` is touched by exactly one thread and the event loop never
blocks on a forward pass. Handlers post commands to an inbox; outputs come back through per-request asyncio
queues fed with `call_soon_threadsafe`."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass

from attnzoo.engine.llm import LLM, RequestOutput
from attnzoo.engine.sampling import SamplingParams
from attnzoo.server.metrics import ServerMetrics

log = logging.getLogger("attnzoo.server")


class EngineDead(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tokens: int = 0
    last_token_time: float = 0.0
    started: bool = False
    aborted: bool = False


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():                 # the handler went away while waiting
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class EngineThread:
    def __init__(self, llm: LLM, metrics: ServerMetrics):
        self.llm, self.metrics = llm, metrics
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []
        self._pending_seqs = 0       # sequences (n per request) posted but not yet in the scheduler
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = False
        # published by the engine thread, read by handlers (plain attribute reads are atomic)
        self.num_waiting = 0
        self.busy = False
        self.last_step_time = time.monotonic()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="attnzoo-engine", daemon=True)

    # ---- event-loop side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def queued(self) -> int:
        """Sequences not yet running: the engine's waiting queue plus adds still in the inbox."""
        with self._cv:
            return self.num_waiting + self._pending_seqs

    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_all(self, items: list[tuple[str, list[int], SamplingParams]],
                queue: asyncio.Queue) -> list[asyncio.Future]:
        """Queue requests in one post (so `queued()` counts them at once); each future resolves to None, or
        to the exception the engine rejected that request with."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in items]
        with self._cv:
            for (rid, ids, params), fut in zip(items, futs):
                self._inbox.append(("add", rid, ids, params, _Stream(loop, queue), fut))
                self._pending_seqs += params.n
            self._cv.notify()
        return futs

    def abort(self, rid: str) -> None:
        self._post(("abort", rid))

    def _post(self, cmd: tuple) -> None:
        with self._cv:
            self._inbox.append(cmd)
            self._cv.notify()

    # ---- engine-thread side ---------------------------------------------------------------------
    def _run(self) -> None:
        llm = self.llm
        try:
            while True:
                with self._cv:
                    while not self._inbox and not llm.has_unfinished() and not self._stop:
                        self.busy = False
                        self._cv.wait()
                    if self._stop:
                        self._fail_all(EngineDead("the server is shutting down"))
                        return
                    cmds, self._inbox = self._inbox, []
                    self.busy = True
                for cmd in cmds:
                    self._handle(cmd)
                with self._cv:
                    self._pending_seqs -= sum(c[3].n for c in cmds if c[0] == "add")
                    self.num_waiting = len(llm.scheduler.waiting)
                outs = llm.step()          # with nothing scheduled it still collects aborted groups
                self.last_step_time = time.monotonic()
                self._dispatch(outs)
                self.num_waiting = len(llm.scheduler.waiting)
                self.metrics.on_step(llm)
                self.metrics.maybe_log(llm, llm.has_unfinished())
        except BaseException as e:  # noqa: BLE001 - any crash must reach /health and the waiting clients
            log.exception("engine thread died")
            self.error = e
            self._fail_all(EngineDead(f"engine failed: {type(e).__name__}: {e}"))

    def _fail_all(self, exc: EngineDead) -> None:
        """Wake every waiting handler with `exc`, so no client hangs on a stopped engine."""
        for st in self._streams.values():
            self._deliver(st, exc)
        self._streams.clear()
        with self._cv:
            for cmd in self._inbox:
                if cmd[0] == "add":
                    try:
                        cmd[4].loop.call_soon_threadsafe(_resolve, cmd[5], exc)
                    except RuntimeError:
                        pass
            self._inbox.clear()

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "abort":
            st = self._streams.get(cmd[1])
            if st is not None:
                st.aborted = True
            self.llm.abort(cmd[1])
            return
        _, rid, ids, params, st, fut = cmd
        try:
            self.llm.add_request(ids, params, rid)
        except Exception as e:  # noqa: BLE001 - add_request validates before it changes anything: reject this
            # request only (a ValueError is the client's; anything else a bug that must not stop the engine)
            if not isinstance(e, ValueError):
                log.exception("add_request failed")
            st.loop.call_soon_threadsafe(_resolve, fut, e)
            return
        self._streams[rid] = st
        st.loop.call_soon_threadsafe(_resolve, fut, None)

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outs:
            st = self._streams.get(out.request_id)
            if st is None:
                continue
            total = sum(len(o.token_ids) for o in out.outputs)
            if not st.started and (total or out.metrics.first_token_time is not None):
                st.started = True
                self.metrics.on_first_token(out)
            if total > st.tokens:
                self.metrics.on_tokens(total - st.tokens, now - st.last_token_time if st.tokens else None)
                st.tokens, st.last_token_time = total, now
            if out.finished:
                self.metrics.on_finished(out)
                del self._streams[out.request_id]
            if not st.aborted:
                self._deliver(st, out)

    @staticmethod
    def _deliver(st: _Stream, item: RequestOutput | BaseException) -> None:
        try:
            st.loop.call_soon_threadsafe(st.queue.put_nowait, item)
        except RuntimeError:       # the event loop is closed (shutdown): nobody is listening
            pass
