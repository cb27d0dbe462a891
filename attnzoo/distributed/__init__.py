"""Process groups for tensor parallelism (the engine) and data parallelism (the arena), on torch.distributed.

A leaf package (it imports torch only), so layers, models and the engine can all take a `ParallelContext`.
`ParallelContext.single()` is the one-process context: every collective is then the identity, so code that
takes a context runs unchanged without torch.distributed.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a rank waits for its peers inside one collective before the group gives up (seconds). A worker
# that dies is noticed sooner: its sockets close (gloo raises at once) and the engine checks its process.
DEFAULT_TIMEOUT_S = float(os.environ.get("ATTNZOO_DIST_TIMEOUT", "300"))


@dataclass
class CommTimer:
    """Seconds this process spent inside the layers' collectives (all-reduce, all-gather), when enabled
    (bench/tp.py: the all-reduce share of a step)."""
    enabled: bool = False
    seconds: float = 0.0
    calls: int = 0


COMM = CommTimer()


def _timed(op, *args, **kw) -> None:
    if not COMM.enabled:
        return op(*args, **kw)
    t0 = time.perf_counter()
    op(*args, **kw)
    COMM.seconds += time.perf_counter() - t0
    COMM.calls += 1


@dataclass(frozen=True)
class ParallelContext:
    """Who this process is in its group. group None: the default (world) group."""
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    @staticmethod
    def single() -> "ParallelContext":
        return ParallelContext()

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def shard(self, size: int) -> tuple[int, int]:
        """[start, end) of this rank's equal share of `size` (which the caller has checked divides)."""
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part

    # ---- collectives (identities when world_size == 1) -----------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        if self.is_parallel:
            _timed(dist.all_reduce, x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's x along the last dimension (rank order)."""
        if not self.is_parallel:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        _timed(dist.all_gather, parts, x.contiguous(), group=self.group)
        return torch.cat(parts, -1)

    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        """Rank src's picklable obj on every rank: a length, then the pickled bytes, as tensors."""
        if not self.is_parallel:
            return obj
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, src, group=self.group)
        if self.rank != src:
            data = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(data, src, group=self.group)
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())


def backend_for(device: torch.device | str) -> str:
    """nccl on CUDA, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port free on the loopback now (the rendezvous of a group on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world_size: int, port: int, backend: str = "gloo",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext:
    """Join (create) the default process group of world_size processes on this machine."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: one tensor-parallel engine "
                           "(or one DDP run) per process")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return ParallelContext(rank, world_size, None)


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def context_from_env(backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext:
    """torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): join that group; unset or
    WORLD_SIZE 1: the one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ParallelContext.single()
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return ParallelContext(dist.get_rank(), dist.get_world_size(), None)


def _run_rank(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    finally:
        destroy_group()


def launch(fn, nproc: int, *args: object) -> None:
    """Run fn(*args) in nproc spawned processes with torchrun's environment variables set (as `torchrun
    --nproc-per-node nproc` would); raises if any of them fails. fn must be importable (spawn)."""
    import torch.multiprocessing as mp
    mp.spawn(_run_rank, args=(fn, nproc, free_port(), args), nprocs=nproc, join=True)
