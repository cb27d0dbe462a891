"""The engine-core process: one `LLM` (built with detokenize=False) and its step loop, fed over a pipe.

The core owns the CPU work of the model, so torch's threads are sized to the cores it may run on; the API
process (event loop, tokeniser, SSE) lives in another process and GIL. The loop blocks in `wait()` while
idle (on the pipe and, under tensor parallelism, on the workers' sentinels); while busy it drains every
command that arrived during the last step (so an abort lands within one step), runs a step and sends one
`StepOutput`. The pipe's EOF means the API process is gone: the core stops (and its TP workers with it)."""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import Connection, wait

import torch

from attnzoo.engine.llm import LLM
from attnzoo.engine.outputs import RequestOutput
from attnzoo.engine.tp import EngineDeadError
from attnzoo.server.core_messages import (Abort, AddRequest, CoreDead, EngineConfig, EngineInfo, EngineStats,
                                          GroupDelta, Query, Reply, SeqDelta, Shutdown, StepOutput)

log = logging.getLogger("attnzoo.engine")


def core_threads(config: EngineConfig) -> int:
    return config.threads or len(os.sched_getaffinity(0))


def core_main(config: EngineConfig, conn: Connection) -> None:
    """Entry point of the spawned process: load, report `EngineInfo` (or `CoreDead`), then serve steps."""
    # Ctrl-C reaches the whole process group: the API process shuts down and then stops the core (and a core
    # whose API process died sees the pipe close), so the core ignores it rather than die mid-step
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    threads = core_threads(config)
    torch.set_num_threads(threads)
    try:
        llm = LLM(config.model, detokenize=False, **config.llm_kwargs)
    except BaseException as e:  # noqa: BLE001 - the reason must reach the API process, which waits for it
        bad_input = isinstance(e, ValueError)
        conn.send(CoreDead(str(e) if bad_input else f"the engine failed to start: {type(e).__name__}: {e}", bad_input))
        return
    try:
        workers = [p.pid for p in llm.tp.procs] if llm.tp is not None else []
        conn.send(EngineInfo(llm.tokenizer, llm.max_model_len, llm.kv.num_pages * llm.kv.page_size,
                             llm.model.config.vocab_size, threads, workers, llm.spec_config is not None))
        EngineCore(llm, conn).run()
    finally:
        llm.close()


class EngineCore:
    """The step loop over a connection; also runs in a thread of the test process (tests/server)."""

    def __init__(self, llm: LLM, conn: Connection):
        self.llm, self.conn = llm, conn
        self._sent: dict[str, list[int]] = {}      # tokens already sent, per group and completion
        self._accepted: list[str] = []
        self._rejected: list[tuple[str, str, str]] = []

    def run(self) -> None:
        try:
            while True:
                if not self.llm.has_unfinished():
                    self._wait_idle()
                stepping = self.llm.has_unfinished()
                for cmd in self._drain():
                    if isinstance(cmd, Shutdown):
                        return
                    stepping |= self._handle(cmd)
                if stepping or self._accepted or self._rejected:
                    # with nothing scheduled a step still collects aborted groups
                    self._send_step(self.llm.step())
        except (EOFError, BrokenPipeError, ConnectionResetError):
            log.info("the API process is gone: the engine core stops")
        except BaseException as e:  # noqa: BLE001 - any crash must reach /health and the waiting clients
            log.exception("the engine core failed")
            try:
                self.conn.send(CoreDead(f"engine failed: {type(e).__name__}: {e}"))
            except OSError:
                pass

    def _wait_idle(self) -> None:
        """Block until a command comes; a tensor-parallel worker that dies meanwhile fails the engine now."""
        tp = self.llm.tp
        sentinels = [p.sentinel for p in tp.procs] if tp is not None else []
        ready = wait([self.conn, *sentinels])
        if self.conn not in ready and (why := self.llm.health_error()) is not None:
            raise EngineDeadError(why)

    def _drain(self) -> list:
        cmds: list = []
        while self.conn.poll():           # EOF also polls ready: recv then raises EOFError
            batch = self.conn.recv()
            cmds.extend(batch)
            if any(isinstance(c, Shutdown) for c in batch):   # the pipe closes right after it
                break
        return cmds

    def _handle(self, cmd) -> bool:
        """Apply one command; True when it calls for a step."""
        if isinstance(cmd, AddRequest):
            try:
                # the API process compiled its grammar already (server/constraints.py)
                self.llm.add_request(cmd.prompt_ids, cmd.params, cmd.request_id, grammar_checked=True)
            except Exception as e:  # noqa: BLE001 - add_request validates before it changes anything: reject this
                # request only (a ValueError is the client's; anything else a bug that must not stop the engine)
                if not isinstance(e, ValueError):
                    log.exception("add_request failed")
                self._rejected.append((cmd.request_id, type(e).__name__, str(e)))
                return False
            self._accepted.append(cmd.request_id)
            self._sent[cmd.request_id] = [0] * cmd.params.n
            return True
        if isinstance(cmd, Abort):
            self.llm.abort(cmd.request_id, cmd.index)
            return True
        if isinstance(cmd, Query):
            try:
                value = self.QUERIES[cmd.what](self.llm)
            except Exception as e:  # noqa: BLE001 - the asker raises it; the engine goes on
                value = e
            self.conn.send(Reply(cmd.qid, value))
            return False
        raise TypeError(f"unknown command {cmd!r}")

    def _send_step(self, outs: list[RequestOutput]) -> None:
        groups = []
        for out in outs:
            sent = self._sent.get(out.request_id)
            if sent is None:
                continue
            seqs = []
            for c in out.outputs:
                k = sent[c.index]
                if len(c.token_ids) > k or c.finish_reason is not None:
                    seqs.append(SeqDelta(c.index, c.token_ids[k:], c.logprobs[k:] if c.logprobs else None,
                                         c.finish_reason, c.stop_reason))
                    sent[c.index] = len(c.token_ids)
            groups.append(GroupDelta(out.request_id, seqs, out.finished, out.cached_tokens, out.metrics,
                                     out.num_preemptions, out.num_draft_tokens, out.num_accepted_tokens))
            if out.finished:
                del self._sent[out.request_id]
        s, spec = self.llm.scheduler, self.llm.spec_stats
        stats = EngineStats(len(s.running), len(s.waiting), self.llm.kv.usage, s.num_preemptions, spec.drafted,
                            spec.accepted, spec.take_lengths())
        self.conn.send(StepOutput(groups, stats, self._accepted, self._rejected))
        self._accepted, self._rejected = [], []

    @staticmethod
    def _pages(llm: LLM) -> list[tuple[int, int]]:
        """For leak checks, when idle: check integrity, drop the prefix cache, then (free, capacity) per pool."""
        llm.check_integrity()
        llm.clear_prefix_cache()
        return [(g.pool.num_free, g.pool.capacity) for g in llm.kv.groups]

    QUERIES = {
        "health": LLM.health_error,
        "idle": lambda llm: not llm.has_unfinished(),
        "groups": lambda llm: len(llm._groups),     # requests not yet reported finished
        "pages": _pages,
    }
