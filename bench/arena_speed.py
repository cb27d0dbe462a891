"""Training speed of every arena contestant at a preset's shapes, and what the preset's full run would take.

For each mechanism: first a correctness check (the model's logits on one training batch with the default
kernels, Triton on a GPU, against the torch forms of every op family: relative L2 error <= 2e-2, TF32
included), then `--steps` real training steps (the arena's step: data, forward, loss, backward, clipping,
AdamW; the first two are not timed) -> train tokens/s, its ratio to GQA's, and the preset's training time
(steps x step time, evaluation not included). The issue's GPU target: every mechanism >= 0.30x GQA at the
gpu preset, and all 13 plus a GQA replicate within 10 minutes on one H200.

    python bench/arena_speed.py --preset gpu          # on the GPU machine (bench/gpu_check.py runs it too)
    python bench/arena_speed.py --quick               # tiny shapes, a few mechanisms (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, machine, markdown  # noqa: E402

from attnzoo.arena import cli as arena  # noqa: E402
from attnzoo.arena import jobs  # noqa: E402
from attnzoo.arena.mechanisms import MECHANISMS, parse_mechanisms  # noqa: E402
from attnzoo.arena.train import build, packed_logits, step_batch, train  # noqa: E402

TORCH_FORMS = {"ATTNZOO_BACKEND": "torch", "ATTNZOO_SPARSE_BACKEND": "torch", "ATTNZOO_DELTA_BACKEND": "torch"}
QUICK = ["--d-model", "32", "--layers", "4", "--heads", "2", "--seq-len", "64", "--batch-size", "2"]


@contextmanager
def torch_forms():
    """Every op family on its torch form (the reference the default kernels are checked against)."""
    saved = {k: os.environ.get(k) for k in TORCH_FORMS}
    os.environ.update(TORCH_FORMS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check(mech: str, s: dict, corpus) -> float:
    """Relative L2 error of the default kernels' logits vs the torch forms', on the first training batch."""
    cfg = MECHANISMS[mech](jobs.shape_of(s))
    model = build(cfg, s["seed"]).to(s["device"]).eval()
    ids, _, cu, _ = step_batch(corpus, jobs.train_config(s, s["seed"]), 0)
    ids = ids.to(s["device"])
    with torch.no_grad():
        got = packed_logits(model, ids, cu).double()
        with torch_forms():
            ref = packed_logits(model, ids, cu).double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def speed(mech: str, s: dict, corpus, val, steps: int) -> tuple[float, int]:
    """(train tokens/s over steps 3.., parameters) of `steps` arena training steps."""
    cfg = MECHANISMS[mech](jobs.shape_of(s))
    tc = jobs.train_config(s, s["seed"])
    tc.steps, tc.eval_every, tc.ckpt_every = steps, 10**9, 10**9
    with tempfile.TemporaryDirectory() as d:
        model, hist = train(mech, cfg, tc, corpus, val[:2], Path(d), progress=False)
    return hist.train_tokens / max(hist.train_seconds, 1e-9), sum(p.numel() for p in model.parameters())


def measure(preset: str, mechanisms: str = "all", steps: int = 8, device: str = "auto", quick: bool = False
            ) -> tuple[list[dict], str]:
    """(one row per mechanism, a header and summary text): the check, then the speed (module docstring)."""
    extra = QUICK if quick else []
    mechs = "gqa,nsa,dsa,msa,gdn" if quick and mechanisms == "all" else mechanisms
    if steps < 3:
        raise ValueError("--steps must be >= 3 (the first two are not timed)")
    s = arena.settings_from(arena.build_parser().parse_args(["--preset", preset, "--device", device, *extra]))
    names = parse_mechanisms(mechs)
    if "gqa" not in names:
        names.insert(0, "gqa")
    if s["device"] == "cuda":
        torch.set_float32_matmul_precision("high")   # as the arena trains: TF32 matmuls
    corpus, val = jobs.inputs(s, True)[:2]
    head = (f"preset {preset}{' (quick)' if quick else ''}: d_model {s['hidden']}, {s['layers']} layers, "
            f"{s['batch_size']} x {s['seq_len']} + {s['mqar_tokens']} MQAR tokens per step, {s['steps']} steps; "
            f"device {s['device']}, {steps} steps, timed from the third")
    rows, gqa = [], None
    for mech in names:
        row: dict = {"mechanism": mech}
        try:
            err = check(mech, s, corpus)
            row["logits rel err vs torch forms"] = f"{err:.1e}"
            if not err <= 2e-2:
                row["note"] = "FAILED: the default kernels disagree with the torch forms; no speed reported"
                rows.append(row)
                continue
            t0 = time.perf_counter()
            tok_s, params = speed(mech, s, corpus, val, steps)
            step_s = (s["batch_size"] * s["seq_len"] + s["mqar_tokens"]) / tok_s
            gqa = tok_s if mech == "gqa" else gqa
            row.update({"params": params, "train tok/s": round(tok_s), "step ms": round(1e3 * step_s, 1),
                        "vs gqa": round(tok_s / gqa, 2) if gqa else None,
                        "preset train min": round(s["steps"] * step_s / 60, 1),
                        "bench s": round(time.perf_counter() - t0, 1)})
        except Exception as e:  # noqa: BLE001 - one mechanism failing must not hide the others
            row["note"] = f"FAILED: {type(e).__name__}: {e}"[:200]
        rows.append(row)
    done = [r for r in rows if "preset train min" in r]
    gqa_min = next((r["preset train min"] for r in done if r["mechanism"] == "gqa"), 0)
    total = sum(r["preset train min"] for r in done) + gqa_min * s["replicates"]
    slow = [r["mechanism"] for r in done if r["vs gqa"] is not None and r["vs gqa"] < 0.30]
    summary = (f"the preset's training, one run at a time: {total:.1f} min for {len(done)} mechanisms + "
               f"{s['replicates']} GQA replicate(s) (evaluation not included); below 0.30x GQA: "
               f"{', '.join(slow) or 'none'}")
    return rows, head + "\n" + summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=list(arena.PRESETS))
    p.add_argument("--mechanisms", default="all")
    p.add_argument("--steps", type=int, default=8, help="training steps per mechanism (the first 2 untimed)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, gqa/nsa/dsa/msa/gdn, 4 steps (CI)")
    args = p.parse_args(argv)
    print(f"machine: {machine()}; cpu flags: {cpu_flags()}"
          + (f"; gpu: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    try:
        rows, text = measure(args.preset, args.mechanisms, 4 if args.quick else args.steps, args.device, args.quick)
    except ValueError as e:
        print(f"arena_speed: error: {e}", file=sys.stderr)
        return 2
    head, summary = text.split("\n", 1)
    print(head)
    print(markdown(rows))
    print("\n" + summary)
    return 1 if any("FAILED" in str(r.get("note", "")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
