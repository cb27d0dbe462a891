"""Tensor-parallel serving: rank 0 is the `LLM` process (scheduler, page accounting, sampling); ranks 1..N-1
are worker processes (torch.multiprocessing, spawned) that each load their shard of the checkpoint
(models/sharding.py), build their shard of the cache tensors with rank 0's layout (`CacheLayout`), and then run
every step rank 0 broadcasts (a `StepInputs`, over torch.distributed: gloo on the CPU, nccl on CUDA) through the
same `ModelRunner.execute` as rank 0: the step's cache instructions (pages to zero, state snapshots to take or
restore) first, then the forward. Only rank 0 keeps the page accounting.

Each worker also holds one end of a pipe: rank 0 rings it before each broadcast (so an idle worker blocks on
the pipe, not inside a collective that would time out) and uses it at start-up to learn that the worker
loaded (or why it failed). A worker that dies fails the engine at once: the pipe breaks, its process is
gone, or gloo reports the closed socket; `EngineDeadError` then reaches the caller (the server's /health
reports it). A worker whose engine process goes away sees the pipe close and exits; workers are daemons, so
an interpreter that exits takes them along, and `close()` joins (then kills) them and leaves the process group.
`LLM` runs `close()` from a `weakref.finalize` too, so an engine that is only dropped frees the group for the
next one in the same process.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from attnzoo import distributed
from attnzoo.engine.cache_tensors import CacheLayout
from attnzoo.engine.model_runner import ModelRunner, StepInputs
from attnzoo.models.decoder import DecoderLM

log = logging.getLogger("attnzoo.engine")
START_TIMEOUT_S = float(os.environ.get("ATTNZOO_TP_START_TIMEOUT", "600"))


class EngineDeadError(RuntimeError):
    """A tensor-parallel worker died or a collective failed: the engine cannot run another step."""


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def _worker_main(rank: int, world: int, port: int, path: str, dtype: torch.dtype, device: str, conn) -> None:
    """Ranks 1..N-1: join the group, load the shard, build the cache, then run steps until told to stop."""
    from attnzoo.models.sharding import load_hf_shard
    dev = rank_device(torch.device(device), rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    try:
        conn.send(("started", None))
        ctx = distributed.init_group(rank, world, port, distributed.backend_for(dev))
        model = load_hf_shard(Path(path), ctx, dtype).to(dev)
        conn.send(("loaded", None))
    except BaseException as e:  # noqa: BLE001 - the reason must reach rank 0, which waits for it
        conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    try:
        layout: CacheLayout = ctx.broadcast_object()   # rank 0's: the same pages and slots, this rank's heads
        runner = ModelRunner(model, layout)
        while True:
            try:
                conn.recv()                       # the doorbell: a step (or the end) is coming
            except EOFError:                      # the engine process is gone
                break
            inputs = ctx.broadcast_object()
            if inputs is None:
                break
            runner.execute(inputs)
    finally:
        distributed.destroy_group()


class TensorParallelGroup:
    """Rank 0's handle on the workers: start-up, one broadcast per step, liveness, shutdown."""

    def __init__(self, path: Path, world: int, dtype: torch.dtype, device: torch.device):
        from attnzoo.models.sharding import load_hf_shard
        self.world, self.device = world, rank_device(device, 0)
        self.closed, self.dead, self.threads = False, None, torch.get_num_threads()
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
        if torch.distributed.is_initialized():
            # an engine dropped inside a reference cycle leaves the group (its finalizer) only once collected
            gc.collect()
        port = distributed.free_port()
        spawn = mp.get_context("spawn")
        self.procs, self.conns = [], []
        try:
            for rank in range(1, world):
                parent, child = spawn.Pipe()
                p = spawn.Process(target=_worker_main, args=(rank, world, port, str(path), dtype, str(device), child),
                                  name=f"attnzoo-tp-rank{rank}", daemon=True)
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            self._await("started")
            self.ctx = distributed.init_group(0, world, port, distributed.backend_for(self.device))
            torch.set_num_threads(max(1, self.threads // world))   # the ranks share the machine's cores
            self.model: DecoderLM = load_hf_shard(path, self.ctx, dtype).to(self.device)
            self._await("loaded")
        except BaseException:
            self.close()
            raise
        log.info("tensor parallel: %d ranks (%s), %s", world, distributed.backend_for(self.device),
                 ", ".join(f"rank {i + 1} pid {p.pid}" for i, p in enumerate(self.procs)))

    def _await(self, what: str) -> None:
        """Each worker's start-up message, while watching that it stays alive."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, (p, conn) in enumerate(zip(self.procs, self.conns), 1):
            while not conn.poll(0.05):
                if not p.is_alive():
                    raise EngineDeadError(f"tensor-parallel rank {rank} exited (code {p.exitcode}) before it {what}")
                if time.monotonic() > deadline:
                    raise EngineDeadError(f"tensor-parallel rank {rank} has not {what} after {START_TIMEOUT_S:.0f} s")
            kind, info = conn.recv()
            if kind == "error":
                raise EngineDeadError(f"tensor-parallel worker failed to start: {info}")

    def start_caches(self, layout: CacheLayout) -> None:
        self.ctx.broadcast_object(layout)

    def check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        for rank, p in enumerate(self.procs, 1):
            if not p.is_alive():
                self.fail(f"tensor-parallel rank {rank} (pid {p.pid}) died (exit code {p.exitcode})")

    def fail(self, reason: str) -> None:
        """Mark the group dead, stop the other workers, raise EngineDeadError."""
        self.dead = reason
        log.error("engine failed: %s", reason)
        self.close()
        raise EngineDeadError(reason)

    def broadcast(self, inputs: StepInputs | None) -> None:
        """Ring every worker, then send them the step (None: stop)."""
        self.check_alive()
        try:
            for conn in self.conns:
                conn.send(1)
            self.ctx.broadcast_object(inputs)
        except (OSError, RuntimeError) as e:   # a broken pipe, or gloo/nccl reporting a lost peer
            self.fail(f"a tensor-parallel worker is gone: {type(e).__name__}: {e}")

    def run(self, runner: ModelRunner, inputs: StepInputs) -> torch.Tensor:
        self.broadcast(inputs)
        try:
            return runner.execute(inputs)
        except RuntimeError as e:      # a collective inside the forward failed: a peer died mid-step
            self.check_alive()
            self.fail(f"a collective failed mid-step: {e}")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers (politely if the group still works), reap them, leave the process group."""
        if self.closed:
            return
        self.closed = True
        if self.dead is None and hasattr(self, "ctx") and all(p.is_alive() for p in self.procs):
            try:
                for conn in self.conns:
                    conn.send(1)
                self.ctx.broadcast_object(None)
            except (OSError, RuntimeError):
                pass
        for conn in self.conns:
            conn.close()               # a worker still waiting on the pipe sees EOF and exits
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(timeout)
        torch.set_num_threads(self.threads)
        if hasattr(self, "ctx"):
            try:
                distributed.destroy_group()
            except Exception:  # noqa: BLE001 - a group broken by a dead peer may fail to tear down; it is gone
                pass
