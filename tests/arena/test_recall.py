"""The recall track: GQA learns MQAR above chance on a tiny setting within seconds, the run is a function of
its seed, test sets are fixed, and the report turns runs into intervals and verdicts."""

from __future__ import annotations

import pytest

from attnzoo.arena.recall import RecallConfig, recall_mechanisms, recall_test_sets, train_recall
from attnzoo.arena.report import claims_table, recall_intervals, recall_table

TINY = RecallConfig(seq_len=16, kv_pairs=2, vocab=8, hidden=64, layers=2, heads=4, steps=200, batch_size=32,
                    lr=3e-3, eval_every=40, eval_examples=128, curve_examples=64, eval_lengths=(16, 32))


@pytest.mark.slow   # 8 s; tests/arena/test_grid.py asserts learning through the same train_recall in CI
def test_gqa_learns_recall_on_a_tiny_setting():
    r = train_recall("gqa", TINY, seed=0)
    acc = r["acc"]["16"]
    # chance is 1 / 8; "one of the 2 values in context" (what a model without recall learns) is 0.5
    assert acc["mean"] >= 0.7 and acc["lo"] > 0.6, acc
    assert r["curve"]["steps"] == [40, 80, 120, 160, 200] and r["curve"]["acc"][-1] > r["curve"]["acc"][0] + 0.2
    assert r["curve"]["loss"][-1] < r["curve"]["loss"][0]
    assert set(r["acc"]) == {"16", "32"} and len(r["per_sequence"]["32"]) == 128
    again = train_recall("gqa", TINY, seed=0)
    assert again["curve"] == r["curve"] and again["acc"] == r["acc"]


def test_recall_settings_and_sets():
    sets = recall_test_sets(TINY)
    assert {n: tuple(x.shape) for n, (x, _) in sets.items()} == {16: (128, 16), 32: (128, 32)}
    assert TINY.pairs(32) == 4 and int((sets[32][1] != -100).sum(1).min()) == 4   # the density is kept
    with pytest.raises(ValueError, match="training length"):
        RecallConfig(seq_len=32, eval_lengths=(64,))
    with pytest.raises(ValueError, match="pairs do not fit"):
        RecallConfig(seq_len=32, kv_pairs=4, vocab=8, eval_lengths=(32, 128))
    keep, skipped = recall_mechanisms(["gqa", "swa_hybrid_3_1", "swa_hybrid_5_1"], TINY)
    assert keep == ["gqa"] and set(skipped) == {"swa_hybrid_3_1", "swa_hybrid_5_1"}


def _run(mech: str, seed: int, acc: dict[str, tuple[float, float, float]]) -> dict:
    return {"mechanism": mech, "seed": seed, "params": 1000, "train_tok_s": 1e4,
            "curve": {"steps": [10, 20], "acc": [0.2, acc["16"][0]]},
            "acc": {n: {"mean": m, "lo": lo, "hi": hi} for n, (m, lo, hi) in acc.items()}}


def test_report_intervals_and_verdicts_on_known_runs():
    res = {"settings": {"recall": {"seq_len": 16}}, "mechanisms": {}, "recall": {
        "gqa_seed0": _run("gqa", 0, {"16": (0.95, 0.92, 0.98), "32": (0.60, 0.55, 0.65)}),
        "gqa_seed1": _run("gqa", 1, {"16": (0.90, 0.86, 0.94), "32": (0.50, 0.45, 0.55)}),
        "gdn_seed0": _run("gdn", 0, {"16": (0.30, 0.25, 0.35), "32": (0.48, 0.40, 0.56)}),
        "gdn_seed1": _run("gdn", 1, {"16": (0.40, 0.35, 0.45), "32": (0.52, 0.44, 0.60)})}}
    iv = recall_intervals(res)
    assert iv["gqa"]["16"].lo == 0.86 and iv["gqa"]["16"].hi == 0.98 and iv["gqa"]["16"].seeds == 2
    assert iv["gqa"]["16"].mean == pytest.approx(0.925)
    text = claims_table(res)
    assert "| linear attention (GDN) recalls worse than softmax attention | MQAR @16 |" in text
    lines = {ln.split("|")[2].strip(): ln for ln in text.splitlines() if "GDN) recalls worse" in ln}
    assert lines["MQAR @16"].rstrip().endswith("| supported |")             # 0.35 vs 0.925: apart
    assert lines["MQAR @32"].rstrip().endswith("| not distinguishable |")   # overlapping at twice the length
    table = recall_table(res)
    assert "| gqa | 2 |" in table and "0.925 [0.860, 0.980]" in table and "| 20 / 20 |" in table and "| — / — |" in table


def test_answer_rows_needles_mixture_and_target():
    import torch
    from attnzoo.arena import data
    from attnzoo.arena.recall import answer_logits, needle_test_sets, recall_model
    rc = RecallConfig(seq_len=32, kv_pairs=2, vocab=40, hidden=32, layers=2, heads=2, steps=60, batch_size=8,
                      eval_every=20, eval_examples=32, curve_examples=32, eval_lengths=(32,), length_mix=2,
                      tie_embeddings=True, needle_lengths=(64,), target=0.0)
    assert rc.train_lengths == (32, 16) and rc.shape().vocab_size == 81
    model = recall_model("gqa", rc, 0)
    assert model.lm_head.weight is model.embed_tokens.weight
    x, y = data.mqar(4, 32, 2, data.rng(1), **rc.task)
    assert int(x.max()) <= 80 and (y[y != data.IGNORE] >= 40).all()     # the track's own vocabulary
    with torch.no_grad():
        rows, labels = answer_logits(model, x, y)
        torch.testing.assert_close(rows, model(x)[y != data.IGNORE].float())
    assert torch.equal(labels, y[y != data.IGNORE])
    [(nx, ny)] = needle_test_sets(rc).values()
    assert nx.shape == (32, 64) and ((ny != data.IGNORE).sum(1) == 1).all()
    r = train_recall("gqa", rc, seed=0)       # target 0.0: stops at the first curve point
    assert r["steps_run"] == 20 and set(r["needle"]) == {"64"} and r["state_bytes"]["32"] > 0
    again = train_recall("gqa", rc, seed=0)   # a run is a function of its seed
    assert again["curve"] == r["curve"] and again["acc"] == r["acc"] and again["needle"] == r["needle"]
