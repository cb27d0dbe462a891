"""The recall grid: the tiny preset learns above chance end to end (sweep, best rate, more seeds, report),
the best rate is picked as documented, and impossible grids fail before any training."""

from __future__ import annotations

import dataclasses
import json

import pytest

from attnzoo.arena.cli import main
from attnzoo.arena.grid import GridConfig, best_lrs, grid_from, run_name
from attnzoo.arena.grid_report import cells


def test_tiny_grid_learns_and_reports(tmp_path):
    assert main(["--track", "grid", "--grid-preset", "tiny", "--mechanisms", "gqa", "--out", str(tmp_path),
                 "--workers", "1", "--quiet"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    [row] = cells(res)
    assert set(res["runs"]) == {"gqa_w64_T16_lr0.003_s0", "gqa_w64_T16_lr0.01_s0", f"gqa_w64_T16_lr{row['lr']:g}_s1"}
    assert row["seeds"] == 2 and row["lr"] in (3e-3, 1e-2)
    # chance is 1 / 8; a model without recall answers "one of the 2 values in context": 0.5
    assert row["acc"].mean >= 0.6 and row["acc"].lo > 0.3, row["acc"]
    assert row["state"] > 0 and set(row["needles"]) == {2}
    report = (tmp_path / "grid.md").read_text()
    assert "| gqa | 64 |" in report and (tmp_path / "grid.png").exists()
    # with the engine's figures beside it, the report adds recall against cost
    (tmp_path / "efficiency.json").write_text(json.dumps({"machine": "m", "runs": {"gqa": {
        "1024": {"decode ms/token": 5.0, "cache B/token": 512.0}}}}))
    assert main(["--track", "grid", "--out", str(tmp_path), "--report-only"]) == 0
    assert "Recall against cost" in (tmp_path / "grid.md").read_text() and (tmp_path / "tradeoff.png").exists()
    # resuming a finished grid trains nothing and keeps every run
    assert main(["--track", "grid", "--grid-preset", "tiny", "--mechanisms", "gqa", "--out", str(tmp_path),
                 "--workers", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == res["runs"]


def _entry(acc: float, steps: int) -> dict:
    return {"acc": {"64": {"mean": acc, "lo": acc, "hi": acc}}, "steps_run": steps}


def test_best_rate_is_accuracy_then_fewest_steps_then_lower_rate():
    g = GridConfig(mechanisms=("gqa",), cells=((64, 4),), widths=(64,), lrs=(1e-3, 3e-3, 1e-2))
    name = lambda lr: run_name("gqa", (64, 4), 64, lr, 0)  # noqa: E731
    runs = {name(1e-3): _entry(0.5, 1200), name(3e-3): _entry(0.99, 400), name(1e-2): _entry(0.99, 700)}
    assert best_lrs(g, runs) == {("gqa", 64, 64): 3e-3}
    runs[name(1e-2)] = _entry(0.99, 400)
    assert best_lrs(g, runs) == {("gqa", 64, 64): 3e-3}
    del runs[name(1e-3)]           # an incomplete sweep picks nothing yet
    assert best_lrs(g, runs) == {}


def test_impossible_grids_fail_before_training():
    with pytest.raises(ValueError, match="LENGTHxPAIRS"):
        grid_from("cpu", ["gqa"], cells="128-8")
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs"):
        grid_from("cpu", ["gqa"], cells="64x40")
    g = grid_from("cpu", ["gqa", "swa_hybrid_3_1"], cells="128x8", widths="128", lrs="1e-3")
    assert g.lrs == (1e-3,) and g.depth("gqa") == 2 and g.depth("swa_hybrid_3_1") == 4
    rc = g.recall("gqa", (128, 8), 128, 1e-3)
    assert rc.heads == 4 and rc.train_lengths == (128, 64, 32, 16) and rc.needle_lengths == (256, 512)


def test_a_grid_extends_but_never_mixes(tmp_path):
    from attnzoo.arena.grid import run_grid, save
    g = grid_from("tiny", ["gqa"])
    save(tmp_path / "results.json", {"grid": dataclasses.asdict(dataclasses.replace(g, seeds=1)), "runs": {}})
    with pytest.raises(ValueError, match="another grid"):     # another width: refused before any training
        run_grid(grid_from("tiny", ["gqa"], widths="32"), tmp_path, workers=1, quiet=True)
