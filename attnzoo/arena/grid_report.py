"""The recall grid's report: per length, each mechanism and width at its best learning rate with intervals
over its seeds (noise.over_seeds), longer-length and needle accuracies, state bytes; accuracy against width
and against state bytes (grid.png); the recall claims at the widest width (report.CLAIMS); with an
efficiency.json beside results.json (bench/arena_efficiency.py --json), recall against decode time and cache
bytes (tradeoff.png)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attnzoo.arena.grid import GridConfig, best_lrs, run_name
from attnzoo.arena.mechanisms import MECHANISMS
from attnzoo.arena.noise import Interval, over_seeds, verdict
from attnzoo.arena.report import CLAIMS

PLOT = "grid.png"


def _iv(runs: list[dict], kind: str, n: int) -> Interval | None:
    got = [r[kind][str(n)] for r in runs if str(n) in r.get(kind, {})]
    return over_seeds([Interval(a["mean"], a["lo"], a["hi"]) for a in got]) if got else None


def cells(results: dict) -> list[dict]:
    """One row per (mechanism, width, length) whose rate sweep is complete: its best rate's seeds."""
    ran = {r["mechanism"] for r in results["runs"].values()}     # the runs decide, not the last command's list
    g = GridConfig(**{**results["grid"], "mechanisms": tuple(m for m in MECHANISMS if m in ran),
                      "cells": tuple(map(tuple, results["grid"]["cells"]))})
    runs, rows = results["runs"], []
    for (mech, width, T), lr in best_lrs(g, runs).items():
        mine = [runs[n] for s in range(g.seeds) if (n := run_name(mech, (T, dict(g.cells)[T]), width, lr, s)) in runs]
        rows.append(dict(mech=mech, width=width, T=T, lr=lr, seeds=len(mine), runs=mine, params=mine[0]["params"],
                         acc=_iv(mine, "acc", T), acc2=_iv(mine, "acc", 2 * T),
                         needles={f: _iv(mine, "needle", f * T) for f in g.needle_factors},
                         state=mine[0]["state_bytes"][str(T)], steps=[r["steps_run"] for r in mine],
                         seconds=float(sum(r["seconds"] for r in mine))))
    return rows


def _kb(b: float) -> str:
    return f"{b / 1024:.0f} KiB" if b >= 10 * 1024 else f"{b / 1024:.1f} KiB"


def grid_tables(results: dict) -> str:
    g, rows = results["grid"], cells(results)
    out = []
    for T, D in g["cells"]:
        mine = [r for r in rows if r["T"] == T]
        if not mine:
            continue
        needle_heads = [f"needle {f * T}" for f in g["needle_factors"]]
        head = ["mechanism", "width", "best lr", "seeds", f"MQAR {T} (train)", f"MQAR {2 * T}", *needle_heads,
                f"state @{T}", "steps (per seed)", "params"]
        out += [f"### {T} tokens, {D} key-value pairs", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in mine:
            cols = [r["mech"], str(r["width"]), f"{r['lr']:g}", str(r["seeds"]), str(r["acc"]), str(r["acc2"]),
                    *[str(r["needles"][f]) for f in g["needle_factors"]], _kb(r["state"]),
                    " / ".join(map(str, r["steps"])), f"{r['params'] / 1e3:.0f}k"]
            out.append("| " + " | ".join(cols) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def sweep_table(results: dict) -> str:
    """Seed 0 at every rate: training-length accuracy (and steps run), so the rate sensitivity shows."""
    g, runs = results["grid"], results["runs"]
    if len(g["lrs"]) < 2:
        return "(one rate: no sweep)\n"
    head = ["mechanism", "width", "cell"] + [f"lr {lr:g}" for lr in g["lrs"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in (m for m in MECHANISMS if any(r["mechanism"] == m for r in runs.values())):
        for w in g["widths"]:
            for T, D in g["cells"]:
                got = [runs.get(run_name(m, (T, D), w, lr, 0)) for lr in g["lrs"]]
                cols = ["—" if r is None else f"{r['acc'][str(T)]['mean']:.3f} ({r['steps_run']} steps)" for r in got]
                lines.append("| " + " | ".join([m, str(w), f"{T}x{D}", *cols]) + " |")
    return "\n".join(["### The rate sweep (seed 0, accuracy at the training length)", "", *lines, ""]) + "\n"


def grid_claims(results: dict) -> str:
    """The recall claims at the widest width, per length, on the training-length accuracy."""
    rows = cells(results)
    width = max(results["grid"]["widths"])
    iv = {(r["mech"], r["T"]): r["acc"] for r in rows if r["width"] == width}
    lines = [f"| claim | MQAR length (width {width}) | figures (mean [95 % interval], seeds joined) | verdict |",
             "|---|---|---|---|"]
    for text, track, a, b, says in CLAIMS:
        for T, _ in results["grid"]["cells"]:
            if track == "recall" and (a, T) in iv and (b, T) in iv:
                lines.append(f"| {text} | {T} | {a} {iv[a, T]} vs {b} {iv[b, T]} | {verdict(iv[a, T], iv[b, T], says)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "(no claim's pair of mechanisms is in the grid yet)\n"


def grid_plot(results: dict, out: Path) -> Path | None:
    """Accuracy at the training length against width (top) and against state bytes (bottom), one column per
    length, error bars the seeds' joined interval."""
    rows = cells(results)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from attnzoo.arena.report import _style
    Ts = [T for T, _ in results["grid"]["cells"] if any(r["T"] == T for r in rows)]
    mechs = list(dict.fromkeys(r["mech"] for r in rows))
    fig, axes = plt.subplots(2, len(Ts), figsize=(4.5 * len(Ts), 7.5), squeeze=False)
    for j, T in enumerate(Ts):
        for i, m in enumerate(mechs):
            mine = sorted((r for r in rows if r["T"] == T and r["mech"] == m), key=lambda r: r["width"])
            if not mine:
                continue
            y = np.array([r["acc"].mean for r in mine])
            err = np.array([[r["acc"].mean - r["acc"].lo for r in mine], [r["acc"].hi - r["acc"].mean for r in mine]])
            for ax, x in ((axes[0][j], [r["width"] for r in mine]), (axes[1][j], [r["state"] for r in mine])):
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=m, **_style(i))
        axes[0][j].set(title=f"MQAR {T} tokens", xlabel="width", ylabel="accuracy", ylim=(0, 1.02))
        axes[1][j].set(xlabel="state bytes per sequence (bf16 KV; fp32 recurrent)", ylabel="accuracy",
                       xscale="log", ylim=(0, 1.02))
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / PLOT
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def tradeoff_plot(results: dict, eff: dict, out: Path) -> Path | None:
    """The seed thread's trade-off in one figure: recall at the widest width and longest cell (y) against decode
    time per token and cache bytes per token at the longest context measured through the engine (x)."""
    rows = cells(results)
    width, T = max(results["grid"]["widths"]), max(r["T"] for r in rows) if rows else 0
    acc = {r["mech"]: r["acc"] for r in rows if r["width"] == width and r["T"] == T}
    pts = []
    for m, by_ctx in eff["runs"].items():
        ctx = max(by_ctx, key=int) if by_ctx else None
        if m in acc and ctx is not None:
            pts.append((m, acc[m], by_ctx[ctx], int(ctx)))
    if not pts:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "decode ms/token", "decode ms/token through the engine"),
                           (axes[1], "cache B/token", "cache bytes per token (bf16 KV, fp32 state)")):
        for m, iv, e, ctx in pts:
            ax.errorbar([e[key]], [iv.mean], yerr=[[iv.mean - iv.lo], [iv.hi - iv.mean]], marker="o", capsize=3)
            ax.annotate(f"{m} @{ctx // 1024}k", (e[key], iv.mean), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set(xlabel=label, ylabel=f"MQAR accuracy ({T} tokens, width {width})", xscale="log", ylim=(0, 1.05))
    fig.suptitle(f"recall vs cost ({eff['machine']})", fontsize=8)
    fig.tight_layout()
    path = out / "tradeoff.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_grid_report(out: Path, with_plot: bool = True) -> Path:
    results = json.loads((out / "results.json").read_text())
    g = results["grid"]
    runs = results["runs"]
    plot = grid_plot(results, out) if with_plot else None
    lines = ["# attnzoo arena: the recall grid", "",
             f"Machine: {results['machine']}; {results['workers']} runs at a time, 1 thread each  ",
             f"Grid: {len({r['mechanism'] for r in runs.values()})} mechanisms x widths {g['widths']} x cells "
             f"{g['cells']} (length, pairs); rates {g['lrs']} on seed 0, then up to {g['seeds'] - 1} more seeds at "
             f"each cell's best (the seeds column: how many ran); {g['layers']} layers "
             f"(hybrids at their pattern's depth), head_dim {g['head_dim']}, vocabulary {g['vocab']} keys + "
             f"{g['vocab']} values, <|pad|> filler, tied embeddings; at most {g['steps']} steps of "
             f"{g['tokens_per_step']} tokens (lengths T, T/2, ... mixed), stopping at curve accuracy "
             f"{g['target']}.  ",
             f"{len(runs)} runs, {results['wall_s'] / 60:.1f} min wall, "
             f"{sum(r['seconds'] for r in runs.values()) / 60:.1f} min of worker time.", "",
             f"Intervals: 95 % bootstrap over {g['eval_examples']} test sequences per run, joined over seeds (their "
             "envelope). Chance: 1 / vocabulary. "
             "State: cache bytes one sequence of the training length holds.", "",
             grid_tables(results), sweep_table(results), "## Claims", "",
             "A verdict holds for this cell at the rates run. Where a row has one seed, its interval is that "
             "run's test noise alone; where the grid has one rate, a contradicted claim may be that rate failing "
             "the mechanism (the rate sweep shows how sharp that is); hybrids are deeper than the 2-layer models "
             "they are compared with.", "", grid_claims(results)]
    if plot is not None:
        lines += [f"![recall grid]({plot.name})", ""]
    eff_path = out / "efficiency.json"
    if with_plot and eff_path.exists() and (t := tradeoff_plot(results, json.loads(eff_path.read_text()), out)):
        lines += ["## Recall against cost", "", "Decode time per token and cache bytes per token through the "
                  f"engine ({eff_path.name}: the same models with random weights, bench/arena_efficiency.py), at the "
                  "longest context each mechanism was measured at, against the recall above.", "",
                  f"![recall vs cost]({t.name})", ""]
    path = out / "grid.md"
    path.write_text("\n".join(lines))
    return path


__all__ = ["cells", "grid_claims", "grid_plot", "grid_tables", "tradeoff_plot", "write_grid_report"]
