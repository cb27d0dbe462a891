"""`attnzoo arena` end to end on a tiny run: the report and plots appear, the loss goes down, the same seed
gives the same run, --resume keeps finished work; bad options get one sentence and exit status 2."""

from __future__ import annotations

import json
import math

import pytest

from attnzoo.arena.cli import main as arena_main
from attnzoo.arena.report import PLOTS, claims_table
from attnzoo.cli import main

TINY = ["--track", "lm", "--mechanisms", "gdn,gqa", "--steps", "16", "--d-model", "32", "--layers", "4", "--seq-len", "64",
        "--batch-size", "2", "--replicates", "0", "--workers", "1", "--threads", "1", "--quiet"]


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def test_tiny_arena_run_report_plots_and_reproducibility(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["arena", *TINY, "--out", str(a)]) == 0
    ra = _results(a)
    assert list(ra["mechanisms"]) == ["gqa", "gdn"]          # longest first (gdn) is only the order of work
    for name, r in ra["mechanisms"].items():
        lm = r["history"]["lm"]
        assert sum(lm[-4:]) / 4 < sum(lm[:4]) / 4 - 0.3, name
        e = r["eval"]
        assert e["val_loss"] < math.log(516) - 0.5 and set(e["mqar"]) == {"64", "128", "256", "512"}
        assert set(e["needle"]) == {"512", "1024"} and e["decode_tok_s"] > 0
        assert r["params"] > 0 and r["train_tok_s"] > 0
        assert (a / name / "model.safetensors").exists() and not (a / name / "checkpoint.pt").exists()
    report = (a / "report.md").read_text()
    assert "| gqa |" in report and "| gdn |" in report and ra["machine"].split(",")[0] in report
    for png in PLOTS:
        assert (a / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seed: the same run, number for number (timings aside)
    assert arena_main([*TINY, "--out", str(b)]) == 0
    rb = _results(b)
    for name in ra["mechanisms"]:
        x, y = ra["mechanisms"][name], rb["mechanisms"][name]
        assert x["history"]["lm"] == y["history"]["lm"] and x["history"]["val"] == y["history"]["val"]
        same = ("val_loss", "mqar", "needle", "kv_bytes_per_token", "attn_flops_per_token")
        assert {k: x["eval"][k] for k in same} == {k: y["eval"][k] for k in same}
    # a second run into the same directory must be asked for; --resume keeps what is finished
    capsys.readouterr()
    assert arena_main([*TINY, "--out", str(a)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert arena_main([*TINY, "--out", str(a), "--resume"]) == 0
    assert "kept from before: gqa, gdn" in capsys.readouterr().err
    assert _results(a)["mechanisms"]["gqa"]["history"] == ra["mechanisms"]["gqa"]["history"]
    assert arena_main([*TINY, "--out", str(a), "--resume", "--steps", "20"]) == 2
    assert "steps differ" in capsys.readouterr().err
    assert arena_main(["--out", str(a), "--report-only"]) == 0


def test_recall_track_through_the_cli(tmp_path):
    out = tmp_path / "r"
    assert main(["arena", "--track", "recall", "--mechanisms", "gqa,swa_hybrid_5_1", "--recall-steps", "10",
                 "--recall-seeds", "2", "--workers", "1", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    res = _results(out)
    assert list(res["recall"]) == ["gqa_seed0", "gqa_seed1"] and res["mechanisms"] == {}
    assert "swa_hybrid_5_1" in res["recall_skipped"]
    report = (out / "report.md").read_text()
    assert "## Recall track" in report and "| gqa | 2 |" in report and "does not tile 4 layers" in report
    assert (out / "recall_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["--mechanisms", "gqa,flash"], "unknown mechanism flash; allowed: all, mha, mqa, gqa, swa"),
    (["--mechanisms", "swa_hybrid_5_1", "--layers", "4"], "multiple of 6"),
    (["--d-model", "30", "--heads", "4"], "multiple of --heads"),
    (["--seq-len", "100"], "multiple of 16"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--recall-seeds", "0"], "--recall-seeds must be >= 1"),
    (["--report-only", "--out", "/nonexistent/arena"], "nothing to report"),
])
def test_bad_options_one_sentence(argv, message, capsys, tmp_path):
    assert main(["arena", *argv] + ([] if "--out" in argv else ["--out", str(tmp_path)])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lm_claims_use_intervals_and_replicates():
    def row(loss, lo, hi, mech=None, **extra):
        return {"mechanism": mech, "eval": {"val_loss": loss, "val_interval": [lo, hi]}, **extra}
    res = {"settings": {}, "mechanisms": {
        "mha": row(2.00, 1.98, 2.02), "mqa": row(2.01, 1.99, 2.03), "gqa": row(2.005, 1.99, 2.02),
        "mla": row(2.10, 2.08, 2.12), "gqa_seed1": row(2.03, 2.01, 2.05, "gqa", replicate_of="gqa")}}
    text = claims_table(res)
    assert "| MQA nearly matches MHA | LM loss | mqa 2.010 [1.990, 2.030] vs mha 2.000 [1.980, 2.020] | " \
           "not distinguishable |" in text
    assert "gqa 2.018 [1.990, 2.050]" in text                        # two seeds: the envelope of both
    assert "| MLA matches or beats GQA | LM loss | mla 2.100 [2.080, 2.120] vs gqa 2.018 [1.990, 2.050] | " \
           "contradicted |" in text
