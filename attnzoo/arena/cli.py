"""`attnzoo arena`: train every mechanism on the same data, evaluate, and write the report.

    attnzoo arena                                  the cpu preset, every mechanism, into runs/arena
    attnzoo arena --mechanisms gqa,gdn --steps 50  a subset, fewer steps
    attnzoo arena --resume                         continue an interrupted run (finished ones are kept)
    attnzoo arena --preset gpu --out runs/arena-gpu
    attnzoo arena --track grid --out docs/arena    the recall grid (grid.py), resumable
    attnzoo chat --model runs/arena/gdn            talk to what was trained

Here: the options, the presets and the settings they give, and the command. The runs it plans and
results.json: plan.py; one run: jobs.py; several at once: pool.py; data parallel (--nproc): launch.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from attnzoo.arena.jobs import WORKER, any_job, recall_config
from attnzoo.arena.launch import data_parallel, follow_rank0, start_ranks
from attnzoo.arena.mechanisms import MECHANISMS, depth_for, parse_mechanisms
from attnzoo.arena.plan import plan, recorder
from attnzoo.arena.pool import run_pool
from attnzoo.arena.report import table, write_report

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnzoo arena", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Train the same small decoder with each attention mechanism on the same "
                                            "data, evaluate them, and write a report (results.json, report.md, PNGs).",
                                epilog=f"mechanisms: {', '.join(MECHANISMS)}\n\n" + (__doc__ or ""))
    p.add_argument("--track", default="all", choices=["all", "lm", "recall", "grid"],
                   help="lm: language modelling (+ the needle); recall: small models trained on MQAR alone "
                        "(default all: both); grid: the recall grid (grid.py: cells x widths x rates x seeds)")
    p.add_argument("--grid-preset", default="cpu", choices=["cpu", "tiny"], help="the grid's sizes (default cpu)")
    p.add_argument("--grid-cells", help="grid cells as LENGTHxPAIRS,... (default 64x4,128x8,256x16)")
    p.add_argument("--grid-widths", help="grid widths, comma-separated (default 64,128)")
    p.add_argument("--grid-lrs", help="the grid's learning rates, comma-separated (default 3e-4,1e-3,3e-3)")
    p.add_argument("--grid-seeds", type=int, help="seeds per reported grid cell (default 3)")
    p.add_argument("--grid-vocab", type=int, help="keys (and as many values) in the grid (default 32)")
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


def run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    res_path = out / "results.json"
    if args.report_only and args.track != "grid":
        if not res_path.exists():
            raise ValueError(f"{res_path} does not exist: nothing to report")
        return write_report(out)
    names = parse_mechanisms(args.mechanisms)
    if args.track == "grid":
        from attnzoo.arena.grid import grid_from, run_grid
        from attnzoo.arena.grid_report import write_grid_report
        if not args.report_only:
            g = grid_from(args.grid_preset, names, args.grid_cells, args.grid_widths, lrs=args.grid_lrs,
                          seeds=args.grid_seeds, vocab=args.grid_vocab)
            run_grid(g, out, workers=args.workers or min(2, os.cpu_count() or 1), quiet=args.quiet)
        return write_grid_report(out)
    s = settings_from(args)
    depth_for(names, s["layers"])
    WORKER.dp = dp = data_parallel(args, s["device"])
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
    if dp.rank != 0:   # a data-parallel helper: write nothing
        follow_rank0(dp, threads)
        return out
    try:
        results, jobs = plan(args, s, names, out, res_path, workers, threads)
    except BaseException:
        dp.broadcast_object(None)   # the other ranks must not wait for jobs that never come
        raise
    dp.broadcast_object(jobs)    # data parallel: the other ranks train the same runs in the same order
    finished = recorder(results, out, res_path)
    if workers == 1:
        for job in jobs:
            finished(job["run_name"], any_job(job))
    else:
        run_pool(jobs, workers, finished)
    path = write_report(out)
    print(table(results))
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:   # start the ranks ourselves, as torchrun would
        return start_ranks(_rank_main, args.nproc, list(sys.argv[1:] if argv is None else argv))
    try:
        path = run(args)
    except ValueError as e:
        print(f"attnzoo arena: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; `attnzoo arena --resume --out {args.out}` (same options) continues", file=sys.stderr)
        return 130
    if WORKER.dp is None or WORKER.dp.rank == 0:
        print(f"report: {path}", file=sys.stderr)
    return 0


def _rank_main(argv: list[str]) -> None:
    code = main(argv)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
