"""Data-parallel arena runs (`--nproc N`): each mechanism trained by N processes under
DistributedDataParallel. Rank 0 plans and writes; the other ranks train the same runs in the same order and
write nothing. Under torchrun its environment decides; otherwise `start_ranks` starts the N ranks itself."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from attnzoo.arena.jobs import job_run


def data_parallel(args: argparse.Namespace, device: str):
    """The data-parallel context: torchrun's environment (or `start_ranks`'s) when WORLD_SIZE > 1, else one
    process."""
    from attnzoo import distributed
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) != args.nproc:
        raise ValueError(f"--nproc {args.nproc} but WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'unset')}")
    return distributed.context_from_env(distributed.backend_for(device))


def start_ranks(rank_main: Callable[[list[str]], None], nproc: int, argv: list[str]) -> int:
    """Run `rank_main(argv)` in nproc processes, as torchrun would; the command's exit status."""
    from attnzoo import distributed
    try:
        distributed.launch(rank_main, nproc, argv)
    except Exception as e:  # noqa: BLE001 - a rank failed; its own message went to stderr
        print(f"attnzoo arena: error: a data-parallel process failed: {str(e).strip().splitlines()[-1]}",
              file=sys.stderr)
        return 2
    return 0


def follow_rank0(dp, threads: int) -> None:
    """A helper rank: train what rank 0 trains, in its order (recall runs are small: rank 0 trains them alone)."""
    torch.set_num_threads(threads)
    jobs = dp.broadcast_object()
    if jobs is None:
        raise ValueError("rank 0 refused the run (its message above)")
    for job in jobs:
        if not job.get("recall"):
            job_run(job)
