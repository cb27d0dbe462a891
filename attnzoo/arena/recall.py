"""The recall track: small models trained on MQAR alone (Zoology's setting scaled down to what two CPU cores
train in minutes), so the question "do linear, sliding and sparse mechanisms keep softmax attention's
recall, and do hybrids restore it?" gets an answer at all. The LM track's models never learn recall in
their budget (the induction circuit takes far more steps than 250 mixed ones).

Every contestant is the arena's mechanism (mechanisms.py) on a shallower Shape, trained on fresh MQAR
batches (a function of (seed, step)) with the loss on the answer positions only, and tested on fixed sets
shared by all mechanisms and seeds: at the training length (the learning curve, every `eval_every` steps)
and, at the end, at longer lengths with proportionally more key-value pairs (the same density: capacity and
length extrapolation together). Accuracies come with bootstrap intervals over test sequences (noise.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attnzoo.arena import data
from attnzoo.arena.distill import IndexerDistillation
from attnzoo.arena.mechanisms import MECHANISMS, Shape
from attnzoo.arena.noise import bootstrap
from attnzoo.arena.train import TrainConfig, build, optimizer_step, parameters
from attnzoo.models.decoder import DecoderLM


@dataclass(frozen=True)
class RecallConfig:
    seq_len: int = 64                        # the training length
    kv_pairs: int = 4                        # at the training length; longer tests keep the density
    vocab: int = 16                          # distinct keys (and values): chance is 1 / vocab
    noise: str = "pad"                       # filler between queries: <|pad|> (or random values: harder)
    with_replacement: bool = True            # queries ask random keys: no answering by elimination (data.mqar)
    hidden: int = 128
    layers: int = 4                          # 3:1 hybrids tile 4 layers; the 5:1 one needs 6
    heads: int = 4
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    eval_every: int = 50
    eval_examples: int = 256                 # test sequences per length (the bootstrap's units)
    curve_examples: int = 128                # of those, scored at each curve point
    eval_lengths: tuple[int, ...] = (64, 128, 256)
    aux_weight: float = 1.0                  # DSA / MSA index-branch KL, as in the LM track

    def __post_init__(self) -> None:
        if self.seq_len not in self.eval_lengths:
            raise ValueError(f"the recall track's eval lengths {self.eval_lengths} must include its training "
                             f"length {self.seq_len}")
        for n in self.eval_lengths:
            data.mqar(1, n, self.pairs(n), data.rng(0), **self.task)  # raises if impossible

    @property
    def task(self) -> dict:
        return dict(vocab=self.vocab, noise=self.noise, with_replacement=self.with_replacement)

    def pairs(self, length: int) -> int:
        return max(1, self.kv_pairs * length // self.seq_len)

    def shape(self) -> Shape:
        return Shape(vocab_size=data.VOCAB_SIZE, hidden=self.hidden, layers=self.layers, heads=self.heads,
                     head_dim=self.hidden // self.heads, intermediate=2 * self.hidden, seq_len=self.seq_len,
                     max_positions=max(1024, 2 * max(self.eval_lengths)))

    @property
    def chance(self) -> float:
        return 1 / self.vocab


def recall_test_sets(rc: RecallConfig) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed test sets, one per length; seed stream 5 is never trained on and the same for every seed."""
    return {n: data.mqar(rc.eval_examples, n, rc.pairs(n), data.rng(0, 5, n), **rc.task)
            for n in rc.eval_lengths}


@torch.no_grad()
def per_sequence_accuracy(model: DecoderLM, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> list[float]:
    """For each sequence, the fraction of its queries answered with the bound value (argmax)."""
    was = model.training
    model.eval()
    out: list[float] = []
    dev = next(model.parameters()).device
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch].to(dev), y[i:i + batch].to(dev)
        m = yb != data.IGNORE
        right = ((model(xb).argmax(-1) == yb) & m).sum(1).float() / m.sum(1).clamp(min=1)
        out += right.cpu().tolist()
    model.train(was)
    return out


def train_recall(mech: str, rc: RecallConfig, seed: int, *, stop: Callable[[], bool] | None = None,
                 device: str = "cpu") -> dict:
    """Train one contestant on MQAR; returns its results entry (curve, accuracies with intervals, speed).
    `stop()` turning true before a step raises KeyboardInterrupt (the run restarts from scratch on resume:
    it is short)."""
    t0 = time.perf_counter()
    cfg = MECHANISMS[mech](rc.shape())
    dev = torch.device(device)
    model = build(cfg, seed).to(dev).train()
    sched = TrainConfig(steps=rc.steps, lr=rc.lr)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": sched.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=rc.lr, betas=sched.betas, eps=1e-8)
    distill = IndexerDistillation(model, sequences=2)
    tests = recall_test_sets(rc)
    cx, cy = (t[:rc.curve_examples] for t in tests[rc.seq_len])
    curve: dict[str, list[float]] = {"steps": [], "acc": [], "loss": []}
    losses: list[float] = []
    train_s = 0.0
    try:
        for step in range(rc.steps):
            if stop is not None and stop():
                raise KeyboardInterrupt
            x, y = data.mqar(rc.batch_size, rc.seq_len, rc.kv_pairs, data.rng(seed, 6, step), **rc.task)
            x, y = x.to(dev), y.to(dev)
            s0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = sched.lr_at(step)
            logits = model(x).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=data.IGNORE)
            optimizer_step(model, opt, loss, distill, rc.aux_weight, sched.grad_clip)
            train_s += time.perf_counter() - s0
            losses.append(loss.item())
            done = step + 1
            if done % rc.eval_every == 0 or done == rc.steps:
                acc = per_sequence_accuracy(model, cx, cy)
                curve["steps"].append(done)
                curve["acc"].append(sum(acc) / len(acc))
                curve["loss"].append(sum(losses[-rc.eval_every:]) / len(losses[-rc.eval_every:]))
    finally:
        distill.remove()
    acc, per_seq = {}, {}
    for n, (x, y) in tests.items():
        p = per_sequence_accuracy(model, x, y)
        iv = bootstrap(p)
        acc[str(n)] = {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi}
        per_seq[str(n)] = [round(v, 4) for v in p]
    return {"mechanism": mech, "seed": seed, "params": parameters(model), "curve": curve, "acc": acc,
            "per_sequence": per_seq, "train_tok_s": rc.steps * rc.batch_size * rc.seq_len / max(train_s, 1e-9),
            "seconds": time.perf_counter() - t0, "config": asdict(rc)}


def recall_mechanisms(names: list[str], rc: RecallConfig) -> tuple[list[str], dict[str, str]]:
    """The names whose layer pattern tiles the recall depth, and why the others are left out."""
    skipped = {}
    for n in names:
        for ratio in ((3,) if n.endswith("3_1") else (5,) if n.endswith("5_1") else ()):
            if rc.layers % (ratio + 1):
                skipped[n] = f"a {ratio}:1 pattern does not tile {rc.layers} layers"
    return [n for n in names if n not in skipped], skipped


__all__ = ["RecallConfig", "per_sequence_accuracy", "recall_mechanisms", "recall_test_sets", "train_recall"]
