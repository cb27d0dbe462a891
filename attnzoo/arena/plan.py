"""The arena run's bookkeeping: which runs to do (contestants, GQA replicates, recall-track seeds, what
--resume keeps), in which order, and results.json, written again as each run finishes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from attnzoo.arena.jobs import inputs, recall_config
from attnzoo.arena.report import machine, ordered, write_report

# training step time relative to GQA (measured on 2 CPU cores at the cpu preset): the pool starts the long ones first
RELATIVE_COST = {"nsa": 4.5, "dsa": 3.3, "msa": 3.1, "kda_mla_3_1": 2.4, "gdn": 1.9, "gdn_hybrid_3_1": 1.7, "mla": 1.5}


def contestants(names: list[str], s: dict) -> list[tuple[str, str, int]]:
    """(run name, mechanism, seed): the mechanisms, then the GQA replicates with the next seeds."""
    out = [(n, n, s["seed"]) for n in names]
    base = "gqa" if "gqa" in names else None
    if base:
        out += [(f"{base}_seed{s['seed'] + k}", base, s["seed"] + k) for k in range(1, s["replicates"] + 1)]
    return out


def recall_runs(names: list[str], s: dict) -> tuple[list[tuple[str, str, int]], dict[str, str]]:
    """(run name, mechanism, seed) of the recall track: every mechanism whose pattern tiles its depth, with
    `seeds` consecutive seeds; and the mechanisms left out, with the reason."""
    from attnzoo.arena.recall import recall_mechanisms
    keep, skipped = recall_mechanisms(names, recall_config(s))
    return [(f"{n}_seed{s['seed'] + k}", n, s["seed"] + k) for n in keep for k in range(s["recall"]["seeds"])], skipped


def write_results(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def plan(args: argparse.Namespace, s: dict, names: list[str], out: Path, res_path: Path, workers: int,
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
    write_results(res_path, results)
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


def recorder(results: dict, out: Path, res_path: Path) -> Callable[[str, dict], None]:
    """What to do as a run finishes: one line on stderr, its entry into results.json, the report (no plots)
    rewritten."""
    def finished(name: str, entry: dict) -> None:
        if entry.get("track") == "recall":
            results["recall"][name] = entry
            acc = " ".join(f"{a['mean']:.2f}" for a in entry["acc"].values())
            tqdm.write(f"{name} (recall): MQAR {acc}, {entry['seconds'] / 60:.1f} min", file=sys.stderr)
            write_results(res_path, results)
            write_report(out, with_plots=False)
            return
        results["mechanisms"][name] = entry
        results["mechanisms"] = ordered(results["mechanisms"])
        e = entry["eval"]
        tqdm.write(f"{name}: val loss {e['val_loss']:.3f}, MQAR {' '.join(f'{v:.2f}' for v in e['mqar'].values())}, "
                   f"{entry['train_tok_s']:.0f} train tok/s, {entry['seconds'] / 60:.1f} min", file=sys.stderr)
        write_results(res_path, results)
        write_report(out, with_plots=False)
    return finished
