"""What the recall grid (attnzoo/arena/grid.py) costs here, before running it: per mechanism, width and cell,
the time of one training step at 1 thread (the grid runs one run per core), and the whole grid's wall time
on `--workers` cores if every run took its step budget, or stopped at `--stop-at` steps.

Correctness first: for each model, the answer-rows logits the recall track trains on must equal the full
forward's logits at those rows (max abs error <= 1e-4). Peer: transformers' LlamaForCausalLM of GQA's shape
(same width, depth, heads, KV heads, MLP, vocabulary), trained the usual way on the same batches (full
logits): what a user would write with the library everyone uses.

    python bench/arena_grid.py                    # every mechanism, the cpu grid
    python bench/arena_grid.py --mechanisms gqa --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, machine, markdown  # noqa: E402

from attnzoo.arena import data  # noqa: E402
from attnzoo.arena.grid import grid_from  # noqa: E402
from attnzoo.arena.mechanisms import parse_mechanisms  # noqa: E402
from attnzoo.arena.recall import RecallConfig, answer_logits, recall_model, train_batch  # noqa: E402
from attnzoo.arena.train import TrainConfig, optimizer_step  # noqa: E402
from attnzoo.arena.distill import IndexerDistillation  # noqa: E402


def batches(rc: RecallConfig, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [train_batch(rc, 0, i) for i in range(n)]


def step_ms(mech: str, rc: RecallConfig, warm: int, timed: int) -> tuple[float, float]:
    """(ms per training step over `timed` steps after `warm`, the answer-rows logits' max error)."""
    model = recall_model(mech, rc, 0)
    x, y = batches(rc, 1)[0]
    with torch.no_grad():
        full = model(x)[y != data.IGNORE]
        rows, _ = answer_logits(model, x, y)
    err = float((full - rows).abs().max())
    opt = torch.optim.AdamW(model.parameters(), lr=rc.lr)
    distill = IndexerDistillation(model, sequences=2)
    sched = TrainConfig(steps=rc.steps, lr=rc.lr)
    bs = batches(rc, warm + timed)
    for i, (x, y) in enumerate(bs):
        if i == warm:
            t0 = time.perf_counter()
        logits, labels = answer_logits(model, x, y)
        optimizer_step(model, opt, F.cross_entropy(logits, labels), distill, rc.aux_weight, sched.grad_clip)
    distill.remove()
    return 1000 * (time.perf_counter() - t0) / timed, err


def peer_ms(rc: RecallConfig, warm: int, timed: int) -> float | None:
    """transformers' Llama at GQA's shape, full logits (None when transformers is not installed)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    s = rc.shape()
    cfg = LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      head_dim=s.head_dim, max_position_embeddings=s.max_positions, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=rc.lr)
    for i, (x, y) in enumerate(batches(rc, warm + timed)):
        if i == warm:
            t0 = time.perf_counter()
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=data.IGNORE)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return 1000 * (time.perf_counter() - t0) / timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", default="all")
    p.add_argument("--workers", type=int, default=2, help="runs at a time in the projection (default 2)")
    p.add_argument("--stop-at", type=int, default=700, help="a second projection: every run stops here")
    p.add_argument("--quick", action="store_true", help="one cell, one width, 1 + 2 steps (CI)")
    a = p.parse_args()
    torch.set_num_threads(1)
    g = grid_from("cpu", parse_mechanisms(a.mechanisms), "64x4" if a.quick else None, "64" if a.quick else None)
    warm, timed = (1, 2) if a.quick else (len(g.recall("gqa", g.cells[-1], 64, 1e-3).train_lengths), 8)
    runs_per_cell = len(g.lrs) + g.seeds - 1
    rows, total = [], 0.0
    for cell in g.cells:
        for width in g.widths:
            base = g.recall("gqa", cell, width, g.lrs[0])
            peer = peer_ms(base, warm, timed)
            for mech in g.mechanisms:
                ms, err = step_ms(mech, g.recall(mech, cell, width, g.lrs[0]), warm, timed)
                if err > 1e-4:
                    raise SystemExit(f"{mech} {cell} w{width}: answer-rows logits differ from the full forward by {err}")
                total += runs_per_cell * ms
                rows.append({"cell": f"{cell[0]}x{cell[1]}", "width": width, "mechanism": mech, "ms/step": ms,
                             "x GQA-shaped Llama (transformers)": None if peer is None else peer / ms,
                             "run at budget (s)": g.steps * ms / 1000, f"run at {a.stop_at} steps (s)": a.stop_at * ms / 1000})
    print(f"# recall grid cost ({time.strftime('%Y-%m-%d')})\n\nmachine: {machine()}\ncpu flags: {cpu_flags()}\n"
          f"1 thread per run; {timed} timed steps after {warm} (a whole length mixture); step = data excluded, "
          f"forward on the answer rows, backward, clip, AdamW; the peer column is the Llama's step time over ours.\n")
    print(markdown(rows))
    n = len(g.mechanisms) * len(g.widths) * len(g.cells) * runs_per_cell
    budget = total * g.steps / 1000 / a.workers / 60
    early = total * a.stop_at / 1000 / a.workers / 60
    print(f"\nwhole grid: {n} runs ({len(g.lrs)} rates on seed 0 + {g.seeds - 1} seeds at the best), {a.workers} at a "
          f"time: {budget:.0f} min if every run takes its {g.steps} steps, {early:.0f} min if every run stops at "
          f"{a.stop_at} (evaluation not included)")


if __name__ == "__main__":
    main()
