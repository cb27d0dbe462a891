"""The recall grid: Zoology's MQAR sweep on the recall track. Every mechanism x width x (length, pairs) cell,
a learning-rate sweep on seed 0, then more seeds at each cell's best rate; each run is one recall-track run
(recall.py), and the report (grid_report.py) gives each cell's best rate with intervals over its seeds,
against width and against state bytes.

Hybrids need their pattern's depth (4 layers for 3:1, 6 for 5:1) and run at it; every other contestant runs
at `layers`. No contestant gets a short convolution it does not have as published (the delta-rule layers
keep theirs, softmax layers have none).

    attnzoo arena --track grid --out docs/arena          (the cpu grid; resumes: finished runs are kept)
    attnzoo arena --track grid --grid-cells 128x8 --grid-widths 128 --mechanisms gqa
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from attnzoo.arena.jobs import any_job
from attnzoo.arena.plan import write_results as save
from attnzoo.arena.pool import run_pool
from attnzoo.arena.recall import RecallConfig


@dataclass(frozen=True)
class GridConfig:
    mechanisms: tuple[str, ...]
    cells: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16))   # (training length, key-value pairs)
    widths: tuple[int, ...] = (64, 128)
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    seeds: int = 3                   # seed 0 sweeps the rates; seeds 1.. run at the best one
    layers: int = 2
    head_dim: int = 32               # heads = width / head_dim
    vocab: int = 32                  # keys (and as many values): chance 1/32
    steps: int = 1200                # at most: a run stops once its curve reaches `target`
    tokens_per_step: int = 1024
    length_mix: int = 4
    target: float = 0.99
    eval_every: int = 50
    eval_examples: int = 256
    curve_examples: int = 128
    needle_factors: tuple[int, ...] = (2, 4)

    def depth(self, mech: str) -> int:
        ratio = 3 if mech.endswith("3_1") else 5 if mech.endswith("5_1") else 0
        return max(self.layers, ratio + 1) if ratio else self.layers

    def recall(self, mech: str, cell: tuple[int, int], width: int, lr: float) -> RecallConfig:
        T, D = cell
        return RecallConfig(seq_len=T, kv_pairs=D, vocab=self.vocab, hidden=width, layers=self.depth(mech),
                            heads=max(1, width // self.head_dim), steps=self.steps,
                            batch_size=max(1, self.tokens_per_step // T), lr=lr, eval_every=self.eval_every,
                            eval_examples=self.eval_examples, curve_examples=self.curve_examples,
                            eval_lengths=(T, 2 * T), length_mix=min(self.length_mix, max(1, T.bit_length() - 3)),
                            tie_embeddings=True, needle_lengths=tuple(f * T for f in self.needle_factors),
                            target=self.target)


PRESETS: dict[str, dict] = {
    # Zoology's cells, scaled: 2 layers, 32 keys. GQA at (128, 8), width 128, rate 1e-3 reached 0.99 by step
    # 1,050 with 32 keys and stayed at chance-like 0.125 for all 1,200 steps with 64 (8,192 was further off):
    # the runs are in docs/arena/grid-2026-12-07-vocab*
    "cpu": dict(),
    # CI: seconds, yet it must learn (tests/arena/test_grid.py)
    "tiny": dict(cells=((16, 2),), widths=(64,), lrs=(3e-3, 1e-2), seeds=2, vocab=8, steps=200,
                 tokens_per_step=512, length_mix=1, eval_every=40, eval_examples=128, curve_examples=64,
                 needle_factors=(2,)),
}


def run_name(mech: str, cell: tuple[int, int], width: int, lr: float, seed: int) -> str:
    return f"{mech}_w{width}_T{cell[0]}_lr{lr:g}_s{seed}"


def _job(g: GridConfig, mech: str, cell: tuple[int, int], width: int, lr: float, seed: int) -> dict:
    rc = dataclasses.asdict(g.recall(mech, cell, width, lr))
    return dict(run_name=run_name(mech, cell, width, lr, seed), mech=mech, seed=seed, threads=1, recall=True,
                s={"recall": rc, "device": "cpu"}, cell=list(cell), width=width, lr=lr)


def best_lrs(g: GridConfig, runs: dict[str, dict]) -> dict[tuple[str, int, int], float]:
    """Each (mechanism, width, length)'s best rate on seed 0: highest accuracy at the training length, then
    fewest steps to the target (the runs that reached it stopped there), then the lower rate."""
    out = {}
    for mech in g.mechanisms:
        for width in g.widths:
            for cell in g.cells:
                tried = [(lr, runs[n]) for lr in g.lrs if (n := run_name(mech, cell, width, lr, 0)) in runs]
                if len(tried) == len(g.lrs):
                    key = str(cell[0])
                    out[(mech, width, cell[0])] = min(tried, key=lambda t: (-round(t[1]["acc"][key]["mean"], 3),
                                                                              t[1]["steps_run"], t[0]))[0]
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_grid(g: GridConfig, out: Path, workers: int = 2, quiet: bool = False) -> dict:
    """Run every missing run of the grid (resumable: results.json keeps finished ones), in two stages."""
    from attnzoo.arena.report import machine
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = load(path)
    same = ("mechanisms", "seeds")      # more mechanisms or seeds extend a grid; any other change is another grid
    mine = json.loads(json.dumps(dataclasses.asdict(g)))
    if results and {k: v for k, v in results["grid"].items() if k not in same} != \
            {k: v for k, v in mine.items() if k not in same}:
        raise ValueError(f"{path} holds another grid's runs (only --mechanisms and --grid-seeds may change); "
                         f"choose another --out")
    if results:     # the record keeps every mechanism and seed its runs came from
        g = dataclasses.replace(g, seeds=max(g.seeds, results["grid"]["seeds"]), mechanisms=tuple(
            dict.fromkeys([*results["grid"]["mechanisms"], *g.mechanisms])))
    results.update(grid=dataclasses.asdict(g), machine=machine(), workers=workers)
    results.setdefault("runs", {})
    results.setdefault("wall_s", 0.0)
    runs = results["runs"]

    def finished(name: str, entry: dict) -> None:
        runs[name] = entry
        save(path, results)
        if not quiet:
            print(f"{name}: acc {entry['acc'][str(entry['config']['seq_len'])]['mean']:.3f} after "
                  f"{entry['steps_run']} steps, {entry['seconds']:.0f} s", file=sys.stderr)

    sweep = [_job(g, m, c, w, lr, 0) for m in g.mechanisms for w in g.widths for c in g.cells for lr in g.lrs]
    for stage in ("sweep", "seeds"):
        if stage == "seeds":
            best = best_lrs(g, runs)
            todo = [_job(g, m, (T, D), w, lr, s) for (m, w, T), lr in best.items()
                    for D in [dict(g.cells)[T]] for s in range(1, g.seeds)]
        else:
            todo = sweep
        todo = [j for j in todo if j["run_name"] not in runs]
        # the costliest first (hybrids are deeper, longer cells cost more per token), so workers end together
        todo.sort(key=lambda j: -(g.depth(j["mech"]) * j["cell"][0] * j["width"]))
        t0 = time.perf_counter()
        if workers == 1:
            for j in todo:
                finished(j["run_name"], any_job(j))
        elif todo:
            run_pool(todo, workers, finished)
        results["wall_s"] += time.perf_counter() - t0
        save(path, results)
    return results


def grid_from(preset: str, mechanisms: list[str], cells: str | None = None, widths: str | None = None,
              **overrides) -> GridConfig:
    """The preset's grid for `mechanisms`, with cells ("128x8,256x16"), widths ("64,128") or other fields
    (those not None) replaced."""
    kw = dict(PRESETS[preset]) | {k: v for k, v in overrides.items() if v is not None}
    if "lrs" in overrides and overrides["lrs"] is not None:
        kw["lrs"] = tuple(float(v) for v in str(overrides["lrs"]).split(","))
    if cells:
        try:
            kw["cells"] = tuple(tuple(int(v) for v in c.split("x")) for c in cells.split(","))
        except ValueError:
            raise ValueError(f"--grid-cells takes LENGTHxPAIRS,... (e.g. 128x8,256x16), got {cells!r}") from None
    if widths:
        kw["widths"] = tuple(int(w) for w in widths.split(","))
    g = GridConfig(mechanisms=tuple(mechanisms), **kw)
    for m in g.mechanisms:     # raise on an impossible cell before any training
        for c in g.cells:
            for w in g.widths:
                if w % g.head_dim and w > g.head_dim:
                    raise ValueError(f"width {w} is not a multiple of head_dim {g.head_dim}")
                g.recall(m, c, w, g.lrs[0])
    return g


__all__ = ["GridConfig", "PRESETS", "best_lrs", "grid_from", "run_grid", "run_name"]
