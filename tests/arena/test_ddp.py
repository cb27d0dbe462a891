"""Data-parallel arena training (DistributedDataParallel, gloo, 2 processes): the loss curve and the final
weights equal one process's within 1e-4 relative (tolerance: the gradients are summed in another order)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from attnzoo import distributed
from attnzoo.arena.data import VOCAB_SIZE, Corpus
from attnzoo.arena.mechanisms import MECHANISMS, Shape
from attnzoo.arena.train import History, TrainConfig, train

SHAPE = Shape(vocab_size=VOCAB_SIZE, hidden=32, layers=2, heads=2, head_dim=16, intermediate=64, seq_len=64, max_positions=256)
TC = dict(steps=6, batch_size=3, seq_len=64, mqar_tokens=128, mqar_lengths=(64,), eval_every=3, ckpt_every=100,
          lr=3e-3)


def _corpus() -> Corpus:
    rng = np.random.default_rng(0)
    text = rng.integers(32, 127, 20000).astype(np.uint16)
    return Corpus(train=text[:16000], val=text[16000:], files=1, val_files=1, fingerprint="random")


def _train(out: str, mech: str) -> None:
    dp = distributed.context_from_env()
    val = torch.from_numpy(_corpus().val[: 4 * 65].astype(np.int64)).view(4, 65)
    model, hist = train(mech, MECHANISMS[mech](SHAPE), TrainConfig(**TC), _corpus(), val, Path(out) / "run",
                        progress=False, dp=dp)
    if dp.rank == 0:
        torch.save(model.state_dict(), Path(out) / "model.pt")
        (Path(out) / "hist.json").write_text(json.dumps(asdict(hist)))


def test_two_processes_follow_one_process_loss_curve(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _train(str(one), "gqa")
    distributed.launch(_train, 2, str(two), "gqa")
    h1, h2 = (History(**json.loads((d / "hist.json").read_text())) for d in (one, two))
    assert len(h1.lm) == len(h2.lm) == TC["steps"] and h1.val_steps == h2.val_steps == [3, 6]
    np.testing.assert_allclose(h2.lm, h1.lm, rtol=1e-4)
    np.testing.assert_allclose(h2.mqar, h1.mqar, rtol=1e-4)
    np.testing.assert_allclose(h2.val, h1.val, rtol=1e-4)
    w1, w2 = (torch.load(d / "model.pt") for d in (one, two))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert h1.lm[-1] < h1.lm[0]   # it learned something: the comparison is not between two flat lines


@pytest.mark.slow   # 70 s on a 2-core CPU; test_two_processes_follow_one_process_loss_curve covers DDP in `make test`
def test_arena_cli_nproc_2(tmp_path: Path) -> None:
    from attnzoo.arena.cli import main
    out = tmp_path / "arena"
    assert main(["--mechanisms", "gqa", "--steps", "4", "--d-model", "32", "--layers", "2", "--seq-len", "64",
                 "--batch-size", "2", "--replicates", "0", "--nproc", "2", "--no-decode", "--quiet",
                 "--out", str(out)]) == 0
    assert list(json.loads((out / "results.json").read_text())["mechanisms"]) == ["gqa"]
    assert main(["--mechanisms", "dsa", "--nproc", "2", "--out", str(tmp_path / "x")]) == 2   # refused, no hang
