"""The API process's handle on the engine-core process (engine_core.py): it spawns the core, posts
commands down the pipe, and reads the core's messages on the event loop (`add_reader` on the pipe: no
thread, no polling). Each `StepOutput` is turned into per-request `RequestOutput` snapshots by the engine's
own `OutputAssembler` (engine/outputs.py: detokenisation and stop strings happen here, as offline; a completion
that meets a stop string is aborted in the core) and pushed to the handlers' asyncio queues; the metrics are
updated from the same messages. A core that dies (the pipe's EOF, or a `CoreDead`) fails every waiting
handler with `EngineDead`; `close()` stops the core (and `multiprocessing` stops it at exit if no one did)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.util import Finalize
from typing import Any

from attnzoo.engine.outputs import OutputAssembler
from attnzoo.engine.sampling import SamplingParams
from attnzoo.server.core_messages import (Abort, AddRequest, CoreDead, EngineConfig, EngineInfo, EngineStats, Query,
                                          Reply, Shutdown, StepOutput)
from attnzoo.server.engine_core import core_main
from attnzoo.server.metrics import ServerMetrics

log = logging.getLogger("attnzoo.server")
STOP_TIMEOUT_S = 10.0


class EngineDead(RuntimeError):
    pass


class CoreError(RuntimeError):
    """The core refused a request for a reason that is not the client's (a bug): a 500."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    asm: OutputAssembler
    seqs: int
    accepted: asyncio.Future
    tokens: int = 0
    last_token_time: float = 0.0
    started: bool = False
    aborted: bool = False


def _stop_core(proc: mp.Process, conn, timeout: float = STOP_TIMEOUT_S) -> None:
    """Ask the core to stop, close the pipe (a core mid-step sees EOF at its next drain), reap it."""
    try:
        conn.send([Shutdown()])
    except (OSError, ValueError):
        pass
    conn.close()
    proc.join(timeout)
    if proc.is_alive():
        log.warning("the engine core did not stop in %.0f s: killing it", timeout)
        proc.kill()
        proc.join(timeout)


class EngineClient:
    def __init__(self, config: EngineConfig):
        """Spawn the core and wait until its model is loaded (or it fails: ValueError for bad input such
        as an unknown model, EngineDead otherwise)."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # not a daemon: a daemonic process may not start children, and the core starts tensor-parallel workers
        self._proc = ctx.Process(target=core_main, args=(config, child), name="attnzoo-engine-core")
        self._proc.start()
        child.close()
        # before multiprocessing joins its non-daemonic children at exit (which would wait on a core whose
        # pipe is still open), stop the core
        self._finalizer = Finalize(self, _stop_core, args=(self._proc, self._conn), exitpriority=10)
        self._streams: dict[str, _Stream] = {}
        self._queries: dict[int, asyncio.Future] = {}
        self._ids, self._qids = itertools.count(), itertools.count()
        self._pending_seqs = 0                     # sequences posted but not yet accepted or refused
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics: ServerMetrics | None = None
        self.stats = EngineStats(0, 0, 0.0, 0)     # as of the last step
        self.last_step_time = time.monotonic()
        self.error: EngineDead | None = None
        self.info = self._await_info()
        log.info("engine core: pid %d, %d torch threads", self._proc.pid, self.info.threads)

    def _await_info(self) -> EngineInfo:
        wait([self._conn, self._proc.sentinel])
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            msg = CoreDead(f"the engine core exited while loading (exit code {self._proc.exitcode})")
        if isinstance(msg, CoreDead):
            self._finalizer()
            raise (ValueError if msg.bad_input else EngineDead)(msg.reason)
        return msg

    # ---- lifetime -------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._proc.pid

    def attach(self, loop: asyncio.AbstractEventLoop, metrics: ServerMetrics) -> None:
        """Start reading the core's messages on `loop` (the app's lifespan does this)."""
        self._loop, self.metrics = loop, metrics
        if self.error is None:
            loop.add_reader(self._conn.fileno(), self._on_readable)

    def close(self) -> None:
        """Fail whatever still waits, then stop the core; idempotent."""
        if self.error is None:
            self._detach()
            self._fail_all(EngineDead("the server is shutting down"))
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self.error is None and self._proc.is_alive()

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    def queued(self) -> int:
        """Sequences not yet running: the core's waiting queue plus adds it has not taken yet."""
        return self.stats.waiting + self._pending_seqs

    # ---- requests (event loop only) -------------------------------------------------------------------------
    def new_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_all(self, items: list[tuple[str, list[int], SamplingParams]],
                queue: asyncio.Queue) -> list[asyncio.Future]:
        """Post the requests in one message (so `queued()` counts them at once); each future resolves to None
        when the core takes the request, or to the exception it refused it with."""
        if not self.alive:
            raise EngineDead(f"the engine is not running: {self.error or 'the core process exited'}")
        if not self._streams:
            self.last_step_time = time.monotonic()   # idle until now: the stall clock starts here
        streams = [_Stream(queue, OutputAssembler(rid, ids, p, self.info.tokenizer), p.n, self._loop.create_future())
                   for rid, ids, p in items]
        for (rid, _, _), st in zip(items, streams):
            self._streams[rid] = st
        self._pending_seqs += sum(st.seqs for st in streams)
        self._send([AddRequest(rid, ids, p) for rid, ids, p in items])
        return [st.accepted for st in streams]

    def abort(self, rid: str) -> None:
        st = self._streams.get(rid)
        if st is not None:
            st.aborted = True          # its final output still comes, for the metrics, but is not delivered
        self._send([Abort(rid)])

    async def query(self, what: str, timeout: float | None = None) -> Any:
        """Ask the core (between two steps) for one of EngineCore.QUERIES."""
        if self.error is not None:
            raise self.error
        qid = next(self._qids)
        fut = self._queries[qid] = self._loop.create_future()
        self._send([Query(qid, what)])
        try:
            value = await asyncio.wait_for(fut, timeout)
        finally:
            self._queries.pop(qid, None)
        if isinstance(value, BaseException):
            raise value
        return value

    def query_sync(self, what: str, timeout: float = 30.0) -> Any:
        """`query` from another thread than the event loop's (tests, debugging)."""
        return asyncio.run_coroutine_threadsafe(self.query(what, timeout), self._loop).result(timeout + 1)

    async def health_error(self, timeout: float) -> str | None:
        """Why the engine cannot serve, or None: asks the core (a dead tensor-parallel worker shows at once)."""
        try:
            return await self.query("health", timeout)
        except EngineDead as e:
            return str(e)
        except asyncio.TimeoutError:
            return f"the engine core has not answered for {timeout:.0f} s"

    def _send(self, cmds: list) -> None:
        if self.error is not None:
            return
        try:
            self._conn.send(cmds)
        except OSError:                 # the core is gone; the reader reports why
            self._gone(None)

    # ---- the core's messages (event loop) -------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            while self.error is None and self._conn.poll():
                msg = self._conn.recv()
                if isinstance(msg, StepOutput):
                    self._on_step(msg)
                elif isinstance(msg, Reply):
                    fut = self._queries.get(msg.qid)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.value)
                elif isinstance(msg, CoreDead):
                    self._gone(msg.reason)
        except (EOFError, OSError):
            self._gone(None)

    def _on_step(self, msg: StepOutput) -> None:
        now = time.monotonic()
        self.stats, self.last_step_time = msg.stats, now
        for rid in msg.accepted:
            st = self._streams[rid]
            self._pending_seqs -= st.seqs
            if not st.accepted.done():   # (a handler cancelled meanwhile has aborted it)
                st.accepted.set_result(None)
        for rid, kind, text in msg.rejected:
            st = self._streams.pop(rid)
            self._pending_seqs -= st.seqs
            if not st.accepted.done():
                st.accepted.set_exception(ValueError(text) if kind == "ValueError" else CoreError(f"{kind}: {text}"))
        m = self.metrics
        for g in msg.outputs:
            st = self._streams.get(g.request_id)
            if st is None:              # ended here already (stop strings)
                continue
            # the one difference from offline: a stop string met here is the core's to abort (late tokens ignored)
            stopped = [d.index for d in g.seqs
                       if st.asm.add(d.index, d.token_ids, d.logprobs, d.finish_reason, d.stop_reason)]
            out = st.asm.snapshot(g.cached_tokens, g.metrics, g.num_preemptions,
                                  (g.num_draft_tokens, g.num_accepted_tokens))
            if stopped and not g.finished:
                self._send([Abort(g.request_id, i) for i in stopped])
            total = sum(len(c.token_ids) for c in out.outputs)
            if not st.started and (total or out.metrics.first_token_time is not None):
                st.started = True
                m.on_first_token(out)
            if total > st.tokens:
                m.on_tokens(total - st.tokens, now - st.last_token_time if st.tokens else None)
                st.tokens, st.last_token_time = total, now
            if out.finished:
                m.on_finished(out)
                self._streams.pop(g.request_id, None)
            if not st.aborted:
                st.queue.put_nowait(out)
        m.on_step(msg.stats)
        m.maybe_log(msg.stats, bool(self._streams))

    def _detach(self) -> None:
        if self._loop is not None and not self._conn.closed:
            self._loop.remove_reader(self._conn.fileno())

    def _gone(self, reason: str | None) -> None:
        if self.error is not None:
            return
        self._detach()
        if reason is None:
            self._proc.join(1)
            reason = f"the engine core process exited (exit code {self._proc.exitcode})"
        log.error("engine failed: %s", reason)
        self.error = EngineDead(f"engine failed: {reason}")
        self._fail_all(self.error)

    def _fail_all(self, exc: EngineDead) -> None:
        """Wake every waiting handler with `exc`, so no client hangs on a stopped engine."""
        for st in self._streams.values():
            if not st.accepted.done():
                st.accepted.set_exception(exc)
            st.queue.put_nowait(exc)
        self._streams.clear()
        for fut in self._queries.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending_seqs = 0
