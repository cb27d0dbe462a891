"""Training: the loss goes down, one seed gives identical runs, a resumed run ends where an uninterrupted
one does, and the index branches learn from their KL only (the main model never sees it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attnzoo.arena import data
from attnzoo.arena.data import VOCAB_SIZE
from attnzoo.arena.distill import IndexerDistillation
from attnzoo.arena.mechanisms import MECHANISMS, Shape
from attnzoo.arena.train import TrainConfig, build, step_batch, train

SHAPE = Shape(vocab_size=VOCAB_SIZE, hidden=32, layers=4, heads=4, head_dim=8, intermediate=96, seq_len=64,
              max_positions=512)


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000)).encode()
    arr = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    return data.Corpus(train=arr[:-4000], val=arr[-4000:], files=1, val_files=1, fingerprint="synthetic")


def _tc(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=2, seq_len=64, lr=1e-2, mqar_tokens=128, mqar_lengths=(32, 64), eval_every=6,
                ckpt_every=4, eval_windows=4, seed=0)
    return TrainConfig(**{**base, **kw})


def _val(c: data.Corpus) -> torch.Tensor:
    return data.val_windows(c.val, 64, 4)


def test_loss_goes_down_and_one_seed_reproduces(corpus, tmp_path):
    cfg = MECHANISMS["gqa"](SHAPE)
    _, h1 = train("gqa", cfg, _tc(), corpus, _val(corpus), tmp_path / "a", progress=False)
    _, h2 = train("gqa", cfg, _tc(), corpus, _val(corpus), tmp_path / "b", progress=False)
    assert np.mean(h1.lm[-3:]) < np.mean(h1.lm[:3]) - 0.5
    assert h1.val[-1] < h1.val[0] and len(h1.val) == 2
    assert h1.lm == h2.lm and h1.mqar == h2.mqar and h1.val == h2.val
    _, h3 = train("gqa", cfg, _tc(seed=1), corpus, _val(corpus), tmp_path / "c", progress=False)
    assert h3.lm != h1.lm


def test_resume_ends_where_an_uninterrupted_run_does(corpus, tmp_path):
    cfg = MECHANISMS["gdn"](SHAPE)
    full, hf = train("gdn", cfg, _tc(), corpus, _val(corpus), tmp_path / "full", progress=False)
    _, hp = train("gdn", cfg, _tc(), corpus, _val(corpus), tmp_path / "part", progress=False, stop_at=5)
    assert len(hp.lm) == 5 and (tmp_path / "part" / "checkpoint.pt").exists()
    resumed, hr = train("gdn", cfg, _tc(), corpus, _val(corpus), tmp_path / "part", progress=False, resume=True)
    assert hr.lm == hf.lm and hr.val == hf.val and hr.steps == list(range(12))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    calls = iter(range(100))    # a worker's stop flag turning true before step 7: checkpoint, then KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train("gdn", cfg, _tc(), corpus, _val(corpus), tmp_path / "stopped", progress=False,
              stop=lambda: next(calls) >= 7)
    _, hs = train("gdn", cfg, _tc(), corpus, _val(corpus), tmp_path / "stopped", progress=False, resume=True)
    assert hs.lm == hf.lm
    with pytest.raises(ValueError, match="other settings"):
        train("gdn", cfg, _tc(lr=5e-3), corpus, _val(corpus), tmp_path / "part", progress=False, resume=True)


def test_step_batches_are_packed_sequences_from_seed_and_step(corpus):
    tc = _tc()
    ids, labels, cu, n_lm = step_batch(corpus, tc, 3)
    assert n_lm == 2 * 64 and int(cu[-1]) == len(ids) == len(labels)
    assert (cu[1:] - cu[:-1]).tolist() == [64, 64] + [64] * 2        # step 3: MQAR length 64, 128 tokens
    again = step_batch(corpus, tc, 3)
    assert torch.equal(ids, again[0]) and torch.equal(labels, again[1])
    assert torch.equal(labels[:n_lm - 1][:63], ids[1:64])              # LM labels: the next byte
    assert ((labels[n_lm:] == data.IGNORE) | (labels[n_lm:] >= data.VALUE_BASE)).all()


@pytest.mark.parametrize("name,branch", [("dsa", "wk.weight"), ("msa", "index_proj.weight")])
def test_index_branches_learn_from_their_kl_only(name, branch):
    torch.manual_seed(0)
    model = build(MECHANISMS[name](SHAPE), seed=0)
    distill = IndexerDistillation(model, sequences=2)
    assert len(distill.layers) == SHAPE.layers
    x = torch.randint(0, 256, (2, 64))
    lm = model(x).logsumexp(-1).mean()            # stand-in for the LM loss
    aux = distill.loss()
    assert aux is not None and aux.item() > 0
    main_grads = torch.autograd.grad(lm, [p for n, p in model.named_parameters() if branch in n], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in main_grads)   # top-k: no gradient from the LM loss
    named = dict(model.named_parameters())
    aux.backward()
    assert all(named[n].grad is not None and named[n].grad.abs().max() > 0 for n in named if branch in n)
    assert named["embed_tokens.weight"].grad is None                   # the KL reads detached inputs
    with torch.no_grad():
        model(x)
    assert distill.loss() is None                                      # evaluation captures nothing
    distill.remove()


@pytest.mark.parametrize("name,branch", [("dsa", "wk.weight"), ("msa", "index_proj.weight")])
def test_the_training_loop_steps_the_index_branch_on_its_kl(name, branch, corpus, tmp_path):
    """Through train() itself: every step logs a KL and the index branch moves (the distillation loss is part
    of what the optimiser steps on, with gradients)."""
    cfg = MECHANISMS[name](SHAPE)
    model, h = train(name, cfg, _tc(steps=3, eval_every=3, ckpt_every=3), corpus, _val(corpus), tmp_path / name,
                     progress=False)
    assert len(h.aux) == 3 and all(a > 0 for a in h.aux)
    start = dict(build(cfg, seed=0).named_parameters())
    moved = [n for n, p in model.named_parameters() if branch in n and not torch.equal(p, start[n])]
    assert moved and len(moved) == sum(branch in n for n in start)


def test_train_config_schedule():
    tc = _tc(steps=100, warmup=0.1)
    assert tc.lr_at(0) == pytest.approx(tc.lr / 10) and tc.lr_at(9) == pytest.approx(tc.lr)
    assert tc.lr_at(99) == pytest.approx(tc.lr * 0.1, rel=0.01)
    lrs = [tc.lr_at(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert dataclasses.asdict(tc)["steps"] == 100
