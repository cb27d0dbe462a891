"""Train one arena contestant: AdamW, warm-up + cosine schedule, gradient clipping, one seed for the
initialisation and the data order, checkpoints every N steps and resume, a tqdm bar, tokens/s measured.

Every step is one packed forward (the training path: varlen sequences, no cache) over `batch_size` corpus
windows of `seq_len` bytes and ~`mqar_tokens` tokens of MQAR sequences (the length cycles through
`mqar_lengths` from step to step). Loss = LM cross-entropy + `mqar_weight` * MQAR cross-entropy on the answer
positions + `aux_weight` * the index branches' KL (distill.py; DSA and MSA only).

Initialisation: each parameter is drawn from a generator seeded by (seed, its name), so parameters with the
same name (embeddings, MLPs, norms) start identical in every contestant. Weights N(0, sqrt(2 / (5 fan_in)))
(GPT-NeoX's "small init": GPT-2's 0.02 at width 768, 0.079 at width 64) and token embeddings N(0, 1): with a
fixed 0.02 everywhere at width 64, softmax attention never learned MQAR (stuck answering "one of the values in
context"), with these it does in ~200 steps (the recall track). Output
projections scaled by 1/sqrt(2 * layers) (GPT-2); delta-rule decays and step sizes as in fla / Mamba.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from attnzoo.arena.data import IGNORE, Corpus, kv_pairs, lm_batch, mqar, rng
from attnzoo.arena.distill import IndexerDistillation
from attnzoo.distributed import ParallelContext
from attnzoo.layers.batch import Batch
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.native import config_from_json
from attnzoo.models.weights import model_class

OUT_PROJ = ("o_proj.weight", "out_proj.weight", "down_proj.weight")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8                 # corpus windows per step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05                # fraction of the steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    mqar_tokens: int = 1024             # per step
    mqar_lengths: tuple[int, ...] = (64, 128, 256)
    mqar_kv_per: int = 16               # one key-value pair per this many tokens
    mqar_weight: float = 1.0
    aux_weight: float = 1.0             # index-branch KL (DSA, MSA)
    aux_sequences: int = 2              # sequences of each step the KL is computed on
    seed: int = 0
    eval_every: int = 50                # validation loss every N steps (and at the end)
    eval_windows: int = 16
    ckpt_every: int = 50
    device: str = "cpu"

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine to min_lr_ratio * lr (step counts from 0)."""
        warm = max(1, int(self.warmup * self.steps))
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, self.steps - warm)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# --------------------------------------------------------------------------------------------- model

def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def small_init_std(fan_in: int) -> float:
    return math.sqrt(2 / (5 * fan_in))


@torch.no_grad()
def init_weights(model: DecoderLM, seed: int) -> DecoderLM:
    """Deterministic initialisation, a function of (seed, parameter name); see the module docstring."""
    layers = model.config.num_layers
    for name, p in model.named_parameters():
        g = _gen(seed, name)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":               # decay rates exp(A) in [1, 16] (fla / Mamba-2)
            p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
        elif leaf == "dt_bias":           # softplus(dt_bias) = dt, log-uniform in [1e-3, 1e-1]
            dt = torch.exp(torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "conv_weight":       # nn.Conv1d's default: U(-1/sqrt(K), 1/sqrt(K))
            b = 1 / math.sqrt(p.shape[-1])
            p.copy_(torch.empty(p.shape).uniform_(-b, b, generator=g))
        elif name.endswith("bias") or "norm" in name or leaf == "sinks":
            continue                      # constructed values: zeros / ones
        elif name == "embed_tokens.weight":  # N(0, 1) (nn.Embedding's default): token identity dominates the
            p.copy_(torch.empty(p.shape).normal_(0, 1, generator=g))  # residual until layers learn to write to it
        elif p.dim() >= 2 or leaf in ("k_pos", "v_pos"):
            std = small_init_std(p.shape[-1])
            std = std / math.sqrt(2 * layers) if name.endswith(OUT_PROJ) else std
            p.copy_(torch.empty(p.shape).normal_(0, std, generator=g))
    return model


def build(cfg: ModelConfig, seed: int) -> DecoderLM:
    torch.manual_seed(seed)  # layers that draw in __init__ (NSA's position tables) before init_weights
    return init_weights(model_class(cfg)(cfg), seed)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- data

def step_batch(corpus: Corpus, tc: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One packed step: (input ids [N], labels [N] (IGNORE where not scored), cu_seqlens [S+1], LM rows).
    A function of (seed, step) only."""
    w = lm_batch(corpus.train, tc.batch_size, tc.seq_len, tc.seed, step)
    ids, labels = [w[:, :-1].reshape(-1)], [w[:, 1:].reshape(-1)]
    lens = [tc.seq_len] * tc.batch_size
    if tc.mqar_tokens > 0 and tc.mqar_lengths:
        T = tc.mqar_lengths[step % len(tc.mqar_lengths)]
        n = max(1, tc.mqar_tokens // T)
        x, y = mqar(n, T, kv_pairs(T, tc.mqar_kv_per), rng(tc.seed, 2, step))
        ids.append(x.reshape(-1))
        labels.append(y.reshape(-1))
        lens += [T] * n
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return torch.cat(ids), torch.cat(labels), cu, tc.batch_size * tc.seq_len


def packed_logits(model: DecoderLM | nn.Module, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    lens = (cu[1:] - cu[:-1]).tolist()
    pos = torch.cat([torch.arange(n) for n in lens]).to(ids.device)
    if isinstance(model, DecoderLM):
        return model.forward_batch(ids, Batch(positions=pos, cu_seqlens=cu.to(ids.device)))
    return model(ids, pos, cu.to(ids.device))   # DistributedDataParallel(Packed(model))


class Packed(nn.Module):
    """forward_batch as a forward, so DistributedDataParallel (which hooks `forward`) can wrap it."""

    def __init__(self, model: DecoderLM):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        return self.model.forward_batch(ids, Batch(positions=positions, cu_seqlens=cu))


def shard_step(ids: torch.Tensor, labels: torch.Tensor, cu: torch.Tensor, lm_mask: torch.Tensor,
               ctx: ParallelContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data parallelism: this rank's sequences of the step (sequence i goes to rank i % N), as a packed batch."""
    seqs = list(range(ctx.rank, cu.numel() - 1, ctx.world_size))
    rows = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in seqs])
    lens = torch.tensor([int(cu[i + 1] - cu[i]) for i in seqs])
    local_cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    return ids[rows], labels[rows], local_cu, lm_mask[rows]


# ------------------------------------------------------------------------------------------- training

@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    lm: list[float] = field(default_factory=list)
    mqar: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    train_seconds: float = 0.0          # time in training steps (evaluation and checkpoints excluded)
    train_tokens: int = 0


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor,
                   distill: IndexerDistillation | None, aux_weight: float, grad_clip: float) -> torch.Tensor | None:
    """One update: the loss plus the index branches' distillation loss (when the mechanism has one), then
    backward, gradient clipping and the optimiser step. Both tracks train through it. Returns the
    distillation loss (None without one)."""
    aux = distill.loss() if distill else None
    if aux is not None:
        loss = loss + aux_weight * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return aux


@torch.no_grad()
def val_loss(model: DecoderLM, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-byte cross-entropy (nats) over the validation windows [n, T + 1]."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].to(dev)
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was)
    return total / count


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)   # a crash mid-write never leaves a torn checkpoint


def train(name: str, cfg: ModelConfig, tc: TrainConfig, corpus: Corpus, val: torch.Tensor, run_dir: Path, *,
          resume: bool = False, progress: bool = True, stop_at: int | None = None, position: int = 0,
          stop: Callable[[], bool] | None = None, dp: ParallelContext | None = None) -> tuple[DecoderLM, History]:
    """Train (or resume) one contestant; checkpoints go to run_dir/checkpoint.pt. stop_at: leave after that
    many steps with a checkpoint (tests of resume). Ctrl-C, or `stop()` turning true before a step (worker
    processes), checkpoints and raises KeyboardInterrupt.

    dp: data parallelism over an initialised process group (DistributedDataParallel). Every rank builds the
    same step and trains on its share of the sequences; each rank's loss is its sum of token losses over the
    step's token counts (times N, which DDP's gradient averaging divides out), so the gradients, updates and
    logged losses are one process's up to the order of the reductions. Rank 0 evaluates and checkpoints."""
    dp = dp or ParallelContext.single()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    dev = torch.device(tc.device)
    model = build(cfg, tc.seed).to(dev).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=tc.lr, betas=tc.betas, eps=1e-8)
    hist, start = History(), 0
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        # the saved config read as native checkpoints are (older field names and defaults accepted)
        if state["train_config"] != asdict(tc) or config_from_json(state["model_config"]) != cfg:
            raise ValueError(f"{ckpt} was written with other settings; start a fresh run (another --out) "
                             f"or resume with the settings it was written with")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        hist, start = History(**state["history"]), state["step"]
    distill = IndexerDistillation(model, tc.aux_sequences)
    if dp.is_parallel and distill:
        raise ValueError("data-parallel training has no index-branch distillation yet (DSA, MSA): its KL is taken "
                         "on a step's first sequences, which live on one rank; train these with one process")
    net: nn.Module = model
    if dp.is_parallel:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(Packed(model), find_unused_parameters=True)
    lead = dp.rank == 0

    def checkpoint(step: int) -> None:
        if not lead:
            return
        _save(ckpt, {"step": step, "model": model.state_dict(), "optim": opt.state_dict(), "history": asdict(hist),
                     "train_config": asdict(tc), "model_config": asdict(cfg)})

    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    bar = tqdm(range(start, end), initial=start, total=tc.steps, desc=f"{name:>15}", unit="step",
               disable=not progress or not lead, leave=position == 0, position=position, dynamic_ncols=True)
    completed = start
    try:
        for step in bar:
            if stop is not None and stop():
                raise KeyboardInterrupt
            ids, labels, cu, n_lm = step_batch(corpus, tc, step)
            ids, labels = ids.to(dev), labels.to(dev)
            t0 = time.perf_counter()
            lr = tc.lr_at(step)
            for gr in opt.param_groups:
                gr["lr"] = lr
            lm_mask = torch.zeros_like(labels, dtype=torch.bool)
            lm_mask[:n_lm] = True
            n_ans = int(((labels != IGNORE) & ~lm_mask).sum())           # the whole step's counts
            step_tokens = int(ids.numel())
            if dp.is_parallel:
                ids, labels, cu, lm_mask = shard_step(ids, labels, cu, lm_mask, dp)
            logits = packed_logits(net, ids, cu).float()
            ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            ans = (labels != IGNORE) & ~lm_mask
            lm = ce[lm_mask].sum() / n_lm
            mq = ce[ans].sum() / n_ans if n_ans else lm.new_zeros(())
            loss = (lm + tc.mqar_weight * mq) * dp.world_size
            if dp.is_parallel:                                   # the logged values: the whole step's means
                lm, mq = dp.all_reduce(torch.stack([lm.detach(), mq.detach()]))
            aux = optimizer_step(model, opt, loss, distill, tc.aux_weight, tc.grad_clip)
            completed = step + 1
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step >= start + 2 or start + 2 >= end:  # the first steps pay one-time costs
                hist.train_seconds += time.perf_counter() - t0
                hist.train_tokens += step_tokens
            hist.steps.append(step)
            hist.lm.append(lm.item())
            hist.mqar.append(mq.item())
            hist.aux.append(aux.item() if aux is not None else 0.0)
            hist.lr.append(lr)
            done = completed
            if lead and (done % tc.eval_every == 0 or done == tc.steps):
                hist.val_steps.append(done)
                hist.val.append(val_loss(model, val))
            if done % tc.ckpt_every == 0 or done == end:
                checkpoint(done)
            bar.set_postfix(lm=f"{lm.item():.3f}", mqar=f"{mq.item():.3f}",
                            val=f"{hist.val[-1]:.3f}" if hist.val else "-")
    except KeyboardInterrupt:
        if completed > start:
            checkpoint(completed)  # a step in flight before its update is redone on resume
        bar.close()
        raise
    finally:
        distill.remove()
    bar.close()
    return model.eval(), hist
