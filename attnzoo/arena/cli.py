"""`attnzoo arena`: train every mechanism on the same data, evaluate, and write the report.

    attnzoo arena                                  the cpu preset, every mechanism, into runs/arena
    attnzoo arena --mechanisms gqa,gdn --steps 50  a subset, fewer steps
    attnzoo arena --resume                         continue an interrupted run (finished ones are kept)
    attnzoo arena --preset gpu --out runs/arena-gpu
    attnzoo chat --model runs/arena/gdn            talk to what was trained
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnzoo.arena import data
from attnzoo.arena.mechanisms import MECHANISMS, Shape, depth_for, parse_mechanisms
from attnzoo.arena.report import machine, ordered, table, write_report

PRESETS: dict[str, dict] = {
    # on 2 cores (2 workers): the LM track ~20 minutes (13 mechanisms + a GQA replicate, quiet machine, before the
    # init change), the recall track ~12 (shared machine): together over the 25; see the README
    "cpu": dict(hidden=64, layers=12, heads=4, head_dim=16, intermediate=192, seq_len=256, batch_size=8, steps=250,
                lr=3e-3, mqar_tokens=1024, mqar_lengths=[64, 128, 256], eval_every=50, eval_windows=32,
                mqar_eval_lengths=[64, 128, 256, 512], mqar_eval_examples=16, needle_contexts=[512, 1024],
                needle_depths=[0.1, 0.3, 0.5, 0.7, 0.9], needle_per_depth=2, decode_context=4096, decode_tokens=32,
                cost_contexts=[32768, 1 << 20], max_positions=8192, replicates=1,
                # the recall track: what 2 shared cores train for 12 mechanisms x 2 seeds in ~12 minutes
                recall=dict(seq_len=16, kv_pairs=2, vocab=8, noise="pad", with_replacement=True, hidden=64, layers=4, heads=4, steps=250,
                            batch_size=32, lr=3e-3, eval_every=25, eval_examples=256, curve_examples=128,
                            eval_lengths=[16, 32, 64], seeds=2)),
    "gpu": dict(hidden=256, layers=12, heads=8, head_dim=32, intermediate=768, seq_len=1024, batch_size=32,
                steps=3000, lr=1.5e-3, mqar_tokens=8192, mqar_lengths=[128, 256, 512, 1024], eval_every=250,
                eval_windows=128, mqar_eval_lengths=[128, 256, 512, 1024, 2048], mqar_eval_examples=64,
                needle_contexts=[2048, 4096, 8192], needle_depths=[0.1, 0.3, 0.5, 0.7, 0.9], needle_per_depth=4,
                decode_context=4096, decode_tokens=64, cost_contexts=[32768, 1 << 20], max_positions=16384,
                replicates=1,
                # sizes only: never run on a GPU yet (see the README)
                recall=dict(seq_len=128, kv_pairs=16, vocab=64, noise="values", with_replacement=True, hidden=128, layers=4, heads=4,
                            steps=2000, batch_size=128, lr=3e-3, eval_every=100, eval_examples=512,
                            curve_examples=256, eval_lengths=[128, 256, 512], seeds=2)),
}

# training step time relative to GQA (measured on 2 CPU cores at the cpu preset): the pool starts the long ones first
RELATIVE_COST = {"nsa": 4.5, "dsa": 3.3, "msa": 3.1, "kda_mla_3_1": 2.4, "gdn": 1.9, "gdn_hybrid_3_1": 1.7, "mla": 1.5}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo arena", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Train the same small decoder with each attention mechanism on the same "
                                            "data, evaluate them, and write a report (results.json, report.md, PNGs).",
                                epilog=f"mechanisms: {', '.join(MECHANISMS)}\n\n" + (__doc__ or ""))
    p.add_argument("--track", default="all", choices=["all", "lm", "recall"],
                   help="lm: language modelling (+ the needle); recall: small models trained on MQAR alone "
                        "(default all: both)")
    p.add_argument("--recall-steps", type=int, help="training steps per recall-track run")
    p.add_argument("--recall-seeds", type=int, help="seeds per mechanism in the recall track (preset: 2)")
    p.add_argument("--mechanisms", default="all", help="all, or a comma-separated list (default all)")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="sizes and lengths (default cpu: ~30 min "
                                                                           "on 2 cores for both tracks; gpu: larger)")
    p.add_argument("--steps", type=int, help="training steps per mechanism")
    p.add_argument("--d-model", type=int, dest="hidden", metavar="D",
                   help="hidden size (head_dim follows: d_model / heads)")
    p.add_argument("--layers", type=int, help="depth (hybrids: 3:1 needs a multiple of 4, 5:1 of 6)")
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--seq-len", type=int, help="training length (sparse sizes scale from it)")
    p.add_argument("--batch-size", type=int, help="corpus windows per step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="one seed: initialisation and data order (default 0)")
    p.add_argument("--replicates", type=int, help="extra seeds of GQA, to measure seed-to-seed noise (preset: 1)")
    p.add_argument("--out", default="runs/arena", help="output directory (default runs/arena)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: finished mechanisms are kept, "
                                                         "interrupted ones continue from their checkpoint")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    p.add_argument("--workers", type=int, help="mechanisms trained at once, one process each (default: 2 on a CPU "
                                               "with >= 2 cores, 1 on a GPU)")
    p.add_argument("--nproc", type=int, default=1, help="train each mechanism with N data-parallel processes "
                                                      "(DistributedDataParallel, gloo on the CPU / nccl on GPUs); "
                                                      "under torchrun its WORLD_SIZE decides (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and the plots from results.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def settings_from(args: argparse.Namespace) -> dict:
    s = dict(PRESETS[args.preset])
    for key in ("steps", "hidden", "layers", "heads", "seq_len", "batch_size", "lr", "replicates"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.hidden is not None or args.heads is not None:
        if s["hidden"] % s["heads"]:
            raise ValueError(f"--d-model {s['hidden']} must be a multiple of --heads {s['heads']}")
        s["head_dim"] = s["hidden"] // s["heads"]
        if args.hidden is not None:
            s["intermediate"] = 3 * s["hidden"]
    for key in ("steps", "hidden", "layers", "heads", "batch_size"):
        if s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if s["seq_len"] < 64 or s["seq_len"] % 16:
        raise ValueError(f"--seq-len must be a multiple of 16 and >= 64, got {s['seq_len']}")
    if s["head_dim"] < 4 or s["head_dim"] % 2:
        raise ValueError(f"head_dim ({s['hidden']} / {s['heads']} = {s['head_dim']}) must be even and >= 4")
    if not s["lr"] > 0:
        raise ValueError(f"--lr must be > 0, got {s['lr']}")
    if s["replicates"] < 0:
        raise ValueError(f"--replicates must be >= 0, got {s['replicates']}")
    s["mqar_lengths"] = [t for t in s["mqar_lengths"] if t <= s["seq_len"]] or [s["seq_len"]]
    s["max_positions"] = max(s["max_positions"], s["decode_context"] + s["decode_tokens"],
                             max(s["needle_contexts"]), max(s["mqar_eval_lengths"]))
    s["recall"] = dict(s["recall"])
    for key, arg in (("steps", "recall_steps"), ("seeds", "recall_seeds")):
        if getattr(args, arg, None) is not None:
            if getattr(args, arg) < 1:
                raise ValueError(f"--{arg.replace('_', '-')} must be >= 1, got {getattr(args, arg)}")
            s["recall"][key] = getattr(args, arg)
    recall_config(s)  # raises on impossible recall settings before any training
    s["seed"] = args.seed
    s["device"] = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    return s


def shape_of(s: dict) -> Shape:
    return Shape(vocab_size=data.VOCAB_SIZE, hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                 head_dim=s["head_dim"], intermediate=s["intermediate"], seq_len=s["seq_len"],
                 max_positions=s["max_positions"])


def recall_config(s: dict):
    from attnzoo.arena.recall import RecallConfig
    r = {k: v for k, v in s["recall"].items() if k != "seeds"}
    return RecallConfig(**{**r, "eval_lengths": tuple(r["eval_lengths"])})


def recall_runs(names: list[str], s: dict) -> tuple[list[tuple[str, str, int]], dict[str, str]]:
    """(run name, mechanism, seed) of the recall track: every mechanism whose pattern tiles its depth, with
    `seeds` consecutive seeds; and the mechanisms left out, with the reason."""
    from attnzoo.arena.recall import recall_mechanisms
    keep, skipped = recall_mechanisms(names, recall_config(s))
    return [(f"{n}_seed{s['seed'] + k}", n, s["seed"] + k) for n in keep for k in range(s["recall"]["seeds"])], skipped


def train_config(s: dict, seed: int):
    from attnzoo.arena.train import TrainConfig
    return TrainConfig(steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                       mqar_tokens=s["mqar_tokens"], mqar_lengths=tuple(s["mqar_lengths"]), seed=seed,
                       eval_every=s["eval_every"], eval_windows=s["eval_windows"], ckpt_every=s["eval_every"],
                       device=s["device"])


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def contestants(names: list[str], s: dict) -> list[tuple[str, str, int]]:
    """(run name, mechanism, seed): the mechanisms, then the GQA replicates with the next seeds."""
    out = [(n, n, s["seed"]) for n in names]
    base = "gqa" if "gqa" in names else None
    if base:
        out += [(f"{base}_seed{s['seed'] + k}", base, s["seed"] + k) for k in range(1, s["replicates"] + 1)]
    return out


def run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    res_path = out / "results.json"
    if args.report_only:
        if not res_path.exists():
            raise ValueError(f"{res_path} does not exist: nothing to report")
        return write_report(out)
    names = parse_mechanisms(args.mechanisms)
    s = settings_from(args)
    depth_for(names, s["layers"])
    global _DP
    _DP = dp = data_parallel(args, s["device"])
    if dp.is_parallel:
        bad = sorted({"dsa", "msa"} & set(names))
        if bad:
            raise ValueError(f"--nproc > 1 cannot train {', '.join(bad)} (their index-branch distillation runs on one "
                             f"process); leave them out or use --nproc 1")
        if args.workers not in (None, 1):
            raise ValueError("--nproc > 1 trains one mechanism at a time over all processes: drop --workers")
    workers = 1 if dp.is_parallel else args.workers or (1 if s["device"] == "cuda" else min(2, os.cpu_count() or 1))
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // (workers * dp.world_size))
    if dp.rank != 0:   # a data-parallel helper: train what rank 0 trains, write nothing
        torch.set_num_threads(threads)
        jobs = dp.broadcast_object()
        if jobs is None:
            raise ValueError("rank 0 refused the run (its message above)")
        for job in jobs:
            if not job.get("recall"):   # recall runs are small: rank 0 trains them alone
                job_run(job)
        return out
    try:
        results, jobs = _plan(args, s, names, out, res_path, workers, threads)
    except BaseException:
        dp.broadcast_object(None)   # the other ranks must not wait for jobs that never come
        raise
    dp.broadcast_object(jobs)    # data parallel: the other ranks train the same runs in the same order

    def finished(name: str, entry: dict) -> None:
        if entry.get("track") == "recall":
            results["recall"][name] = entry
            acc = " ".join(f"{a['mean']:.2f}" for a in entry["acc"].values())
            tqdm.write(f"{name} (recall): MQAR {acc}, {entry['seconds'] / 60:.1f} min", file=sys.stderr)
            _write(res_path, results)
            write_report(out, with_plots=False)
            return
        results["mechanisms"][name] = entry
        results["mechanisms"] = ordered(results["mechanisms"])
        e = entry["eval"]
        tqdm.write(f"{name}: val loss {e['val_loss']:.3f}, MQAR {' '.join(f'{v:.2f}' for v in e['mqar'].values())}, "
                   f"{entry['train_tok_s']:.0f} train tok/s, {entry['seconds'] / 60:.1f} min", file=sys.stderr)
        _write(res_path, results)
        write_report(out, with_plots=False)

    if workers == 1:
        for job in jobs:
            finished(job["run_name"], any_job(job))
    else:
        _pool(jobs, workers, finished)
    path = write_report(out)
    print(table(results))
    return path


def _plan(args: argparse.Namespace, s: dict, names: list[str], out: Path, res_path: Path, workers: int,
          threads: int) -> tuple[dict, list[dict]]:
    """Rank 0 (or the one process): check --resume, write the initial results.json, list the runs to do."""
    if res_path.exists() and not args.resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or --out for a new one")
    if res_path.exists():
        results = json.loads(res_path.read_text())
        diff = sorted(k for k in set(s) | set(results["settings"]) if s.get(k) != results["settings"].get(k))
        if diff:
            raise ValueError(f"{out} was run with other settings ({', '.join(diff)} differ); resume with the same "
                             f"options, or use another --out")
    else:
        results = {"version": 1, "preset": args.preset, "settings": s, "mechanisms": {}}
    results.setdefault("recall", {})
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    if s["device"] == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: the models train in float32
    results["machine"] = machine() + (f"; {workers} runs at a time" if workers > 1 else "")
    corpus = inputs(s, args.no_decode)[0]
    results["corpus"] = {"python": platform.python_version(), "describe": corpus.describe(),
                         "fingerprint": corpus.fingerprint}
    _write(res_path, results)
    lm_runs = contestants(names, s) if args.track in ("all", "lm") else []
    rc_runs, skipped = recall_runs(names, s) if args.track in ("all", "recall") else ([], {})
    results["recall_skipped"] = skipped
    todo = [c for c in lm_runs if not results["mechanisms"].get(c[0], {}).get("eval")]
    kept = [c[0] for c in lm_runs if c not in todo] + [c[0] for c in rc_runs if c[0] in results["recall"]]
    rc_todo = [c for c in rc_runs if c[0] not in results["recall"]]
    print(f"arena: {len(todo)} LM + {len(rc_todo)} recall runs on {s['device']} ({workers} at a time, {threads} threads each) -> {out}"
          + (f"; kept from before: {', '.join(kept)}" if kept else "")
          + f"\nmachine: {machine()}\ncorpus: {corpus.describe()}", file=sys.stderr)
    jobs = [dict(run_name=r, mech=m, seed=sd, s=s, out=str(out), resume=args.resume, progress=not args.quiet,
                 no_decode=args.no_decode, threads=threads) for r, m, sd in todo]
    jobs += [dict(run_name=r, mech=m, seed=sd, s=s, threads=threads, recall=True) for r, m, sd in rc_todo]
    # longest first, so the workers finish together (a recall run costs about a tenth of an LM run)
    jobs.sort(key=lambda j: -RELATIVE_COST.get(j["mech"], 1.0) * (0.1 if j.get("recall") else 1.0))
    return results, jobs


def _pool(jobs: list[dict], workers: int, finished) -> None:
    """Run jobs in `workers` processes (spawned: each loads the corpus once), results in completion order.
    Ctrl-C reaches only this process (workers ignore SIGINT): it raises a stop flag that every worker's
    training loop reads before each step, so each checkpoints and leaves, and queued jobs never start."""
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


_SLOT, _STOP = 0, None
_DP = None   # this process's data-parallel context (set by run)


def data_parallel(args: argparse.Namespace, device: str):
    """The data-parallel context: torchrun's environment (or `launch`'s) when WORLD_SIZE > 1, else one process."""
    from attnzoo import distributed
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) != args.nproc:
        raise ValueError(f"--nproc {args.nproc} but WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'unset')}")
    return distributed.context_from_env(distributed.backend_for(device))


def _init_worker(slots, stop) -> None:
    global _SLOT, _STOP
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _STOP = stop
    with slots.get_lock():
        _SLOT, slots.value = slots.value, slots.value + 1
    parent = os.getppid()

    def orphaned() -> None:  # the parent was killed (not interrupted): stop instead of training for nobody
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)
    threading.Thread(target=orphaned, daemon=True).start()


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
                         stop=_STOP.is_set if _STOP is not None else None)
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
                        progress=job["progress"], position=_SLOT, stop=_STOP.is_set if _STOP is not None else None,
                        dp=_DP)
    if _DP is not None and _DP.rank != 0:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:   # start the ranks ourselves, as torchrun would
        from attnzoo import distributed
        try:
            distributed.launch(_rank_main, args.nproc, list(sys.argv[1:] if argv is None else argv))
        except Exception as e:  # noqa: BLE001 - a rank failed; its own message went to stderr
            print(f"attnzoo arena: error: a data-parallel process failed: {str(e).strip().splitlines()[-1]}",
                  file=sys.stderr)
            return 2
        return 0
    try:
        path = run(args)
    except ValueError as e:
        print(f"attnzoo arena: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; `attnzoo arena --resume --out {args.out}` (same options) continues", file=sys.stderr)
        return 130
    if _DP is None or _DP.rank == 0:
        print(f"report: {path}", file=sys.stderr)
    return 0


def _rank_main(argv: list[str]) -> None:
    code = main(argv)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
