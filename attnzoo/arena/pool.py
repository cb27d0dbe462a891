"""Several arena jobs at once: a pool of spawned processes, one job each at a time, results handed back in
completion order. Ctrl-C reaches only the parent (workers ignore SIGINT): it raises a stop flag that every
worker's training loop reads before each step, so each checkpoints and leaves, and queued jobs never start."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

from attnzoo.arena.jobs import WORKER, any_job


def run_pool(jobs: list[dict], workers: int, finished: Callable[[str, dict], None]) -> None:
    """Run jobs in `workers` processes (spawned: each loads the corpus once); `finished(run name, entry)` as
    each completes."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    ctx = mp.get_context("spawn")
    slots, stop = ctx.Value("i", 0), ctx.Event()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(slots, stop)) as ex:
        pending = {ex.submit(any_job, j): j["run_name"] for j in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    finished(pending.pop(f), f.result())
        except BaseException:
            stop.set()
            ex.shutdown(wait=True, cancel_futures=True)
            raise


def _init_worker(slots, stop) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    WORKER.stop = stop
    with slots.get_lock():
        WORKER.slot, slots.value = slots.value, slots.value + 1
    parent = os.getppid()

    def orphaned() -> None:  # the parent was killed (not interrupted): stop instead of training for nobody
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)
    threading.Thread(target=orphaned, daemon=True).start()
