"""The recall track: small models trained on MQAR alone (Zoology's setting scaled down to what two CPU cores
train in minutes), so the question "do linear, sliding and sparse mechanisms keep softmax attention's
recall, and do hybrids restore it?" gets an answer at all. The LM track's models never learn recall in
their budget (the induction circuit takes far more steps than 250 mixed ones).

Every contestant is the arena's mechanism (mechanisms.py) on a shallower Shape with the track's own
vocabulary (keys, values, <|pad|>), trained on fresh MQAR batches (a function of (seed, step)) with the loss
on the answer positions only (the LM head runs on those rows alone: at a vocabulary of 8,192 the head would
otherwise cost more than the model), and tested on fixed sets shared by all mechanisms and seeds: at the
training length (the learning curve, every `eval_every` steps) and, at the end, at longer lengths with
proportionally more key-value pairs (the same density: capacity and length extrapolation together) and on a
single needle at `needle_lengths`. Accuracies come with bootstrap intervals over test sequences (noise.py).

Training lengths: with `length_mix` > 1 each step takes the next of seq_len, seq_len/2, ... (the same tokens
per step and the same pair density), Zoology's mixture of lengths. In an informal probe at (128 tokens, 8
pairs) on 2 layers, GQA trained on 128 tokens alone stayed at 0.12 (answering "one of the values in
context") for 850 steps; with four lengths it passed 0.9 by step 700: the short sequences teach the
induction circuit first.
"""

from __future__ import annotations

import dataclasses
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
from attnzoo.layers.batch import Batch
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
    batch_size: int = 64                     # sequences of seq_len per step (shorter mixed lengths: more of them)
    lr: float = 3e-3
    eval_every: int = 50
    eval_examples: int = 256                 # test sequences per length (the bootstrap's units)
    curve_examples: int = 128                # of those, scored at each curve point
    eval_lengths: tuple[int, ...] = (64, 128, 256)
    aux_weight: float = 1.0                  # DSA / MSA index-branch KL, as in the LM track
    length_mix: int = 1                      # training lengths: seq_len, seq_len / 2, ... (this many)
    tie_embeddings: bool = False             # Zoology ties the LM head to the embeddings (then init N(0, 1/hidden))
    needle_lengths: tuple[int, ...] = ()     # single-needle tests (data.needle_recall) at these lengths
    target: float | None = None              # stop once the curve accuracy reaches this (None: run every step)

    def __post_init__(self) -> None:
        if self.seq_len not in self.eval_lengths:
            raise ValueError(f"the recall track's eval lengths {self.eval_lengths} must include its training "
                             f"length {self.seq_len}")
        if self.length_mix < 1 or self.seq_len >> (self.length_mix - 1) < 8:
            raise ValueError(f"length_mix {self.length_mix} halves seq_len {self.seq_len} below 8 tokens")
        for n in self.eval_lengths + self.train_lengths:
            data.mqar(1, n, self.pairs(n), data.rng(0), **self.task)  # raises if impossible
        for n in self.needle_lengths:
            data.needle_recall(1, n, data.rng(0), vocab=self.vocab, bases=self.bases)

    @property
    def bases(self) -> tuple[int, int, int]:
        """The track's own vocabulary: keys [0, vocab), values [vocab, 2 vocab), then <|pad|>."""
        return 0, self.vocab, 2 * self.vocab

    @property
    def task(self) -> dict:
        return dict(vocab=self.vocab, noise=self.noise, with_replacement=self.with_replacement, bases=self.bases)

    @property
    def train_lengths(self) -> tuple[int, ...]:
        return tuple(self.seq_len >> k for k in range(self.length_mix))

    def pairs(self, length: int) -> int:
        """Pairs at `length`: the training density, and at least 2 (min(2, kv_pairs)) at shorter lengths of the
        mixture: with one pair "copy the only value" answers without matching keys. The grid's first run (64
        keys, one pair at 16 tokens: docs/arena/grid-2026-12-07-one-pair) stayed at 0.13 at every rate; an
        informal probe with 32 keys and 2 pairs at 16 tokens learned, which is the grid's recipe now."""
        return max(min(2, self.kv_pairs), self.kv_pairs * length // self.seq_len)

    def shape(self) -> Shape:
        longest = max(self.eval_lengths + self.needle_lengths)
        return Shape(vocab_size=2 * self.vocab + 1, hidden=self.hidden, layers=self.layers, heads=self.heads,
                     head_dim=self.hidden // self.heads, intermediate=2 * self.hidden, seq_len=self.seq_len,
                     max_positions=max(1024, 2 * longest))

    @property
    def chance(self) -> float:
        return 1 / self.vocab


def recall_test_sets(rc: RecallConfig) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed test sets, one per length; seed stream 5 is never trained on and the same for every seed."""
    return {n: data.mqar(rc.eval_examples, n, rc.pairs(n), data.rng(0, 5, n), **rc.task)
            for n in rc.eval_lengths}


def needle_test_sets(rc: RecallConfig) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed single-needle sets (seed stream 7), one per needle length."""
    return {n: data.needle_recall(rc.eval_examples, n, data.rng(0, 7, n), vocab=rc.vocab, bases=rc.bases)
            for n in rc.needle_lengths}


def train_batch(rc: RecallConfig, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s MQAR batch: the mixture's length for this step, batch_size * seq_len tokens of it."""
    n = rc.train_lengths[step % len(rc.train_lengths)]
    return data.mqar(rc.batch_size * rc.seq_len // n, n, rc.pairs(n), data.rng(seed, 6, step), **rc.task)


def answer_logits(model: DecoderLM, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the labelled positions only, [answers, V], and those labels (the head skips every other row)."""
    B, T = x.shape
    batch = Batch.dense(B, T, 0, x.device, None)
    rows = (y.reshape(-1) != data.IGNORE).nonzero().squeeze(1)
    batch.logits_rows = rows
    return model.forward_batch(x.reshape(-1), batch).float(), y.reshape(-1)[rows]


@torch.no_grad()
def per_sequence_accuracy(model: DecoderLM, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> list[float]:
    """For each sequence, the fraction of its queries answered with the bound value (argmax)."""
    was = model.training
    model.eval()
    out: list[float] = []
    dev = next(model.parameters()).device
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch].to(dev), y[i:i + batch].to(dev)
        logits, labels = answer_logits(model, xb, yb)
        seq = (yb.reshape(-1) != data.IGNORE).nonzero().squeeze(1) // xb.shape[1]
        right = torch.zeros(len(xb), device=dev).index_add_(0, seq, (logits.argmax(-1) == labels).float())
        out += (right / (yb != data.IGNORE).sum(1).clamp(min=1)).cpu().tolist()
    model.train(was)
    return out


def recall_model(mech: str, rc: RecallConfig, seed: int) -> DecoderLM:
    """Contestant `mech` on the track's shape, initialised from `seed` (tied: embeddings N(0, 1/hidden), so
    the logits start near zero instead of at a spread of sqrt(hidden))."""
    cfg = MECHANISMS[mech](rc.shape())
    if rc.tie_embeddings:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    model = build(cfg, seed)
    if rc.tie_embeddings:
        with torch.no_grad():
            model.embed_tokens.weight.mul_(rc.hidden ** -0.5)
    return model


def state_bytes(model: DecoderLM, length: int) -> float:
    """Cache bytes one sequence of `length` tokens holds (all layers, bf16; recurrent states float32):
    what the mechanism must keep to recall."""
    from attnzoo.arena.costs import kv_bytes_per_token
    return kv_bytes_per_token(model.config, length) * length


def train_recall(mech: str, rc: RecallConfig, seed: int, *, stop: Callable[[], bool] | None = None,
                 device: str = "cpu") -> dict:
    """Train one contestant on MQAR; returns its results entry (curve, accuracies with intervals, speed).
    `stop()` turning true before a step raises KeyboardInterrupt (the run restarts from scratch on resume:
    it is short)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    model = recall_model(mech, rc, seed).to(dev).train()
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
    train_s, tokens = 0.0, 0
    try:
        for step in range(rc.steps):
            if stop is not None and stop():
                raise KeyboardInterrupt
            x, y = (t.to(dev) for t in train_batch(rc, seed, step))
            s0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = sched.lr_at(step)
            logits, labels = answer_logits(model, x, y)
            loss = F.cross_entropy(logits, labels)
            optimizer_step(model, opt, loss, distill, rc.aux_weight, sched.grad_clip)
            train_s += time.perf_counter() - s0
            tokens += x.numel()
            losses.append(loss.item())
            done = step + 1
            if done % rc.eval_every == 0 or done == rc.steps:
                acc = per_sequence_accuracy(model, cx, cy)
                curve["steps"].append(done)
                curve["acc"].append(sum(acc) / len(acc))
                curve["loss"].append(sum(losses[-rc.eval_every:]) / len(losses[-rc.eval_every:]))
                if rc.target is not None and curve["acc"][-1] >= rc.target:
                    break
    finally:
        distill.remove()
    acc, per_seq = {}, {}
    for kind, sets in (("acc", tests), ("needle", needle_test_sets(rc))):
        acc[kind] = {}
        for n, (x, y) in sets.items():
            p = per_sequence_accuracy(model, x, y)
            iv = bootstrap(p)
            acc[kind][str(n)] = {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi}
            per_seq[str(n) if kind == "acc" else f"needle{n}"] = [round(v, 4) for v in p]
    return {"mechanism": mech, "seed": seed, "params": parameters(model), "curve": curve, "acc": acc["acc"],
            "needle": acc["needle"], "per_sequence": per_seq, "steps_run": done,
            "state_bytes": {str(n): state_bytes(model, n) for n in rc.eval_lengths},
            "train_tok_s": tokens / max(train_s, 1e-9), "seconds": time.perf_counter() - t0, "config": asdict(rc)}


def recall_mechanisms(names: list[str], rc: RecallConfig) -> tuple[list[str], dict[str, str]]:
    """The names whose layer pattern tiles the recall depth, and why the others are left out."""
    skipped = {}
    for n in names:
        for ratio in ((3,) if n.endswith("3_1") else (5,) if n.endswith("5_1") else ()):
            if rc.layers % (ratio + 1):
                skipped[n] = f"a {ratio}:1 pattern does not tile {rc.layers} layers"
    return [n for n in names if n not in skipped], skipped


__all__ = ["RecallConfig", "answer_logits", "needle_test_sets", "per_sequence_accuracy", "recall_mechanisms",
           "recall_model", "recall_test_sets", "state_bytes", "train_batch", "train_recall"]
