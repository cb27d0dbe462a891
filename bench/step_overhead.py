"""Host time per decode step where compute is negligible: a 2-layer, d=64 model, so what is measured is the
engine's own work (scheduling, step metadata, per-layer op dispatch, sampling, bookkeeping).

    python bench/step_overhead.py [--rows 1 64 256] [--steps 50] [--quick]

Each row count runs that many greedy requests (16-token prompts, EOS ignored) to a steady decode state,
eagerly and on the compiled decode step (engine/graph.py; its bucket compiled before the clock), then times
`LLM.step()`; the table splits the median step into its phases. Correctness first: a decode
step's logits must equal a full recomputation of the same sequences.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from common import cpu_flags, machine

from attnzoo.engine import LLM, SamplingParams
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM


def tiny_model(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
    model = DecoderLM(cfg).float()
    for p in model.parameters():   # norms are ones at init: randomise everything
        p.data.normal_(0, 0.2)
    return model.eval()


class Phases:
    """Wall time per named phase, accumulated over a step."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


def instrument(llm: LLM, ph: Phases) -> None:
    """Wrap the step's phases: the scheduler, the runner's prepare (plain data) and execute (tensors + forward)
    and the sampler; the rest of `step` is bookkeeping."""
    def wrap(obj, name, label):
        fn = getattr(obj, name)

        def timed(*a, **k):
            with ph(label):
                return fn(*a, **k)
        setattr(obj, name, timed)
    wrap(llm.scheduler, "schedule", "schedule")
    wrap(llm.runner, "prepare", "prepare")
    wrap(llm.runner, "execute", "forward")
    wrap(llm, "sampler", "sample")


def check(llm: LLM) -> None:
    """One normal step, its logits captured: each sampling row equals the model run over the whole sequence."""
    seen: list[torch.Tensor] = []
    execute = llm.runner.execute
    llm.runner.execute = lambda inputs: seen.append(execute(inputs)) or seen[-1]
    reqs = list(llm.scheduler.running)
    lens = [r.num_tokens for r in reqs]
    llm.step()
    llm.runner.execute = execute
    with torch.inference_mode():
        for j, (req, n) in enumerate(list(zip(reqs, lens))[:4]):
            ref = llm.model(torch.tensor([req.all_ids()[:n]]), last_only=True)[0, -1]
            err = (seen[0][j] - ref).abs().max().item()
            assert err < 1e-4, f"decode logits differ from a full recomputation by {err}"


def measure(rows: int, steps: int, compiled: bool) -> dict[str, float]:
    llm = LLM(tiny_model(), max_num_seqs=max(rows, 1), max_num_batched_tokens=max(2048, 16 * rows),
              kv_cache_memory=64 << 20, enable_prefix_caching=False, enforce_eager=not compiled)
    if compiled:   # before the clock: decode steps of `rows` rows then run on the compiled graph
        llm.runner.graph.compile(llm.runner.graph.bucket(rows))
    params = SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True)
    for i in range(rows):
        llm.add_request([(7 * i + t) % 500 + 1 for t in range(16)], params)
    for _ in range(4):            # prefill, then a few warm decode steps
        llm.step()
    check(llm)
    ph = Phases()
    instrument(llm, ph)
    per_step: list[dict[str, float]] = []
    for _ in range(steps):
        ph.t = {}
        t0 = time.perf_counter()
        llm.step()
        ph.t["total"] = time.perf_counter() - t0
        per_step.append(ph.t)
    keys = ["schedule", "prepare", "forward", "sample", "total"]
    med = {k: statistics.median(s.get(k, 0.0) for s in per_step) * 1e3 for k in keys}
    med["other"] = max(0.0, med["total"] - sum(med[k] for k in keys[:-1]))
    return med


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 1 and 8 rows, 5 steps, eager only")
    args = ap.parse_args(argv)
    modes = [False, True]
    if args.quick:
        args.rows, args.steps, modes = [1, 8], 5, [False]
    print(f"# machine: {machine()}; CPU flags: {cpu_flags()}")
    print(f"# model: 2 layers, hidden 64, fp32; median of {args.steps} decode steps; ms per step")
    print("| running requests | decode step | total | schedule | prepare | forward | sample | "
          "other (append, stops, outputs) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in args.rows:
        for compiled in modes:
            m = measure(r, args.steps, compiled)
            print(f"| {r} | {'compiled' if compiled else 'eager'} | {m['total']:.2f} | {m['schedule']:.2f} | "
                  f"{m['prepare']:.2f} | {m['forward']:.2f} | {m['sample']:.2f} | {m['other']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
