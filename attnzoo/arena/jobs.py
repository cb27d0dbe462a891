"""What one process runs for the arena: a job is one contestant (an LM-track run: train, export, reload,
evaluate) or one recall-track run, described by a picklable dict so a pool worker can take it. The inputs
every job shares (corpus, validation windows, test sets, the decode prompt) are built once per process."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnzoo.arena import data
from attnzoo.arena.mechanisms import MECHANISMS, Shape


@dataclass
class Worker:
    """This process's part in the run: its progress-bar slot and the stop flag Ctrl-C raises (pool workers,
    attnzoo/arena/pool.py), and its data-parallel context (set by the command; None before)."""
    slot: int = 0
    stop: Any = None   # a multiprocessing Event
    dp: Any = None     # attnzoo.distributed.ParallelContext

    @property
    def stopped(self) -> Callable[[], bool] | None:
        """What the training loops poll before each step (None: nothing can stop them)."""
        return self.stop.is_set if self.stop is not None else None


WORKER = Worker()


def shape_of(s: dict) -> Shape:
    return Shape(vocab_size=data.VOCAB_SIZE, hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                 head_dim=s["head_dim"], intermediate=s["intermediate"], seq_len=s["seq_len"],
                 max_positions=s["max_positions"])


def recall_config(s: dict):
    from attnzoo.arena.recall import RecallConfig
    r = {k: tuple(v) if isinstance(v, list) else v for k, v in s["recall"].items() if k != "seeds"}
    return RecallConfig(**r)


def train_config(s: dict, seed: int):
    from attnzoo.arena.train import TrainConfig
    return TrainConfig(steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                       mqar_tokens=s["mqar_tokens"], mqar_lengths=tuple(s["mqar_lengths"]), seed=seed,
                       eval_every=s["eval_every"], eval_windows=s["eval_windows"], ckpt_every=s["eval_every"],
                       device=s["device"])


@lru_cache(maxsize=2)
def _inputs(settings_json: str, no_decode: bool):
    s = json.loads(settings_json)
    corpus = data.load_corpus()
    val = data.val_windows(corpus.val, s["seq_len"], s["eval_windows"])
    mqar_sets = data.mqar_eval_sets(tuple(s["mqar_eval_lengths"]), s["mqar_eval_examples"], s["seed"])
    needles = data.needle_sets(corpus.val, tuple(s["needle_contexts"]), tuple(s["needle_depths"]),
                               s["needle_per_depth"], s["seed"])
    prompt = None if no_decode else np.resize(corpus.val, s["decode_context"]).tolist()
    return corpus, val, mqar_sets, needles, prompt


def inputs(s: dict, no_decode: bool):
    """(corpus, validation windows, MQAR test sets, needle sets, decode prompt): deterministic, built once
    per process."""
    return _inputs(json.dumps(s, sort_keys=True), no_decode)


def any_job(job: dict) -> dict:
    return recall_job(job) if job.get("recall") else job_run(job)


def recall_job(job: dict) -> dict:
    """Train and test one recall-track run; returns its results entry."""
    from attnzoo.arena.recall import train_recall
    torch.set_num_threads(job["threads"])
    entry = train_recall(job["mech"], recall_config(job["s"]), job["seed"], device=job["s"]["device"],
                         stop=WORKER.stopped)
    return {**entry, "track": "recall", "threads": job["threads"]}


def job_run(job: dict) -> dict:
    """Train, export, reload and evaluate one contestant; returns its results entry."""
    from attnzoo.arena.evaluate import evaluate
    from attnzoo.arena.export import export_model
    from attnzoo.arena.train import parameters, train
    from attnzoo.models import load_model
    torch.set_num_threads(job["threads"])
    s, run_name, mech = job["s"], job["run_name"], job["mech"]
    corpus, val, mqar_sets, needles, prompt = inputs(s, job["no_decode"])
    t0 = time.perf_counter()
    cfg = MECHANISMS[mech](shape_of(s))
    run_dir = Path(job["out"]) / run_name
    model, hist = train(run_name, cfg, train_config(s, job["seed"]), corpus, val, run_dir, resume=job["resume"],
                        progress=job["progress"], position=WORKER.slot, stop=WORKER.stopped, dp=WORKER.dp)
    if WORKER.dp is not None and WORKER.dp.rank != 0:
        return {}
    export_model(model, run_dir)
    model = load_model(run_dir).to(s["device"])  # what `attnzoo chat --model` will load
    ev = evaluate(mech, model, val=val, mqar_sets=mqar_sets, needles=needles, decode_prompt=prompt,
                  decode_tokens=s["decode_tokens"], cost_contexts=tuple(s["cost_contexts"]))
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    entry = {"mechanism": mech, "seed": job["seed"], "params": parameters(model), "config": dataclasses.asdict(cfg),
             "history": dataclasses.asdict(hist), "train_tok_s": hist.train_tokens / max(hist.train_seconds, 1e-9),
             "eval": ev, "seconds": time.perf_counter() - t0, "model_dir": run_name, "threads": job["threads"]}
    if run_name != mech:
        entry["replicate_of"] = mech
    return entry
