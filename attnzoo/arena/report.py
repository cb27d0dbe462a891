"""results.json -> report.md (one table, the claims checked against the run's own noise) and PNG plots:
loss curves, accuracy vs sequence length (MQAR and the needle), cost vs context (cost model)."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import torch

from attnzoo.arena.costs import attention_flops_per_token, kv_read_bytes_per_token
from attnzoo.arena.mechanisms import DESCRIPTIONS, MECHANISMS
from attnzoo.arena.noise import Interval, over_seeds, verdict
from attnzoo.models.native import config_from_json
from attnzoo.models.registry import cpu_flags

PLOTS = ("loss_curves.png", "accuracy_vs_length.png", "cost_vs_context.png")
RECALL_PLOT = "recall_curves.png"


def machine() -> str:
    """The CPU (and GPU when present), cores, torch and threads: which machine a result came from."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu} ({cpu_flags()}), {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}")




# ------------------------------------------------------------------------------------------ formatting

def _si(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}{unit}"
    return f"{x:.3g}{unit}"


def _ctx(c: int | str) -> str:
    c = int(c)
    return f"{c >> 20}M" if c >= 1 << 20 and c % (1 << 20) == 0 else f"{c >> 10}k" if c >= 1024 and c % 1024 == 0 \
        else str(c)


def ordered(runs: dict[str, dict]) -> dict[str, dict]:
    """Runs in registry order, seed replicates after their mechanism."""
    order = {n: i for i, n in enumerate(MECHANISMS)}
    return dict(sorted(runs.items(), key=lambda nr: (order.get(nr[1].get("mechanism") or nr[0], len(order)),
                                                     "replicate_of" in nr[1], nr[0])))


def _done(results: dict) -> dict[str, dict]:
    return ordered({n: r for n, r in results.get("mechanisms", {}).items() if r.get("eval")})


def table(results: dict) -> str:
    rows = _done(results)
    if not rows:
        return "(no finished mechanism yet)\n"
    first = next(iter(rows.values()))["eval"]
    mq, nd = list(first["mqar"]), list(first["needle"])
    costs = list(first["attn_flops_per_token"])
    kv_ctx = list(first["kv_bytes_per_token"])[0]
    decode_ctx = _ctx(results["settings"]["decode_context"])
    head = (["mechanism", "params", "val loss [95 %]", "val ppl"] + [f"MQAR {_ctx(t)}" for t in mq]
            + [f"needle {_ctx(c)}" for c in nd] + ["train tok/s", f"decode tok/s @{decode_ctx}",
                                                   f"KV B/token @{_ctx(kv_ctx)}"]
            + [f"attn FLOPs/token @{_ctx(c)}" for c in costs])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        e = r["eval"]
        dec = _si(e["decode_tok_s"]) if e.get("decode_tok_s") else f"n/a: {e.get('decode_note') or 'not run'}"
        iv = f" [{e['val_interval'][0]:.3f}, {e['val_interval'][1]:.3f}]" if e.get("val_interval") else ""
        cells = ([name, _si(r["params"]), f"{e['val_loss']:.3f}{iv}", f"{e['val_ppl']:.2f}"]
                 + [f"{e['mqar'][t]:.2f}" for t in mq] + [f"{e['needle'][c]:.2f}" for c in nd]
                 + [_si(r["train_tok_s"]), dec, f"{e['kv_bytes_per_token'][kv_ctx]:.4g}"]
                 + [_si(e["attn_flops_per_token"][c]) for c in costs])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- recall track

def recall_intervals(results: dict) -> dict[str, dict[str, Interval]]:
    """Per mechanism and test length: its seeds' bootstrap intervals joined (noise.over_seeds)."""
    runs: dict[str, list[dict]] = {}
    for r in results.get("recall", {}).values():
        runs.setdefault(r["mechanism"], []).append(r)
    order = {n: i for i, n in enumerate(MECHANISMS)}
    out = {}
    for mech in sorted(runs, key=lambda m: order.get(m, len(order))):
        lengths = list(runs[mech][0]["acc"])
        out[mech] = {n: over_seeds([Interval(r["acc"][n]["mean"], r["acc"][n]["lo"], r["acc"][n]["hi"])
                                    for r in runs[mech]]) for n in lengths}
    return out


def recall_table(results: dict) -> str:
    iv = recall_intervals(results)
    if not iv:
        return "(no finished recall run yet)\n"
    runs = results["recall"]
    train_len = str(results["settings"]["recall"]["seq_len"])
    lengths = list(next(iter(iv.values())))
    head = (["mechanism", "seeds", "params"] + [f"MQAR {n}" + (" (train)" if n == train_len else "") for n in lengths]
            + ["first step ≥ 0.9", "train tok/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mech, by_len in iv.items():
        mine = [r for r in runs.values() if r["mechanism"] == mech]
        firsts = [next((st for st, a in zip(r["curve"]["steps"], r["curve"]["acc"]) if a >= 0.9), None) for r in mine]
        first = " / ".join("—" if f is None else str(f) for f in firsts)
        tok_s = float(np.mean([r["train_tok_s"] for r in mine]))
        lines.append("| " + " | ".join([mech, str(len(mine)), _si(mine[0]["params"])]
                                       + [str(by_len[n]) for n in lengths] + [first, _si(tok_s)]) + " |")
    return "\n".join(lines) + "\n"


def lm_intervals(results: dict) -> dict[str, Interval]:
    """Validation loss per mechanism: each run's bootstrap over windows, joined over its seed replicates."""
    runs: dict[str, list[Interval]] = {}
    for name, r in _done(results).items():
        e = r["eval"]
        lo, hi = e.get("val_interval") or (e["val_loss"], e["val_loss"])
        runs.setdefault(r.get("replicate_of", name), []).append(Interval(e["val_loss"], lo, hi))
    return {m: over_seeds(v) for m, v in runs.items()}


# (claim, track, a, b, what the claim says of a against b) — the thread's claims, each where this run can test it
CLAIMS = [
    ("MQA nearly matches MHA", "lm", "mqa", "mha", "match"),
    ("GQA nearly matches MHA", "lm", "gqa", "mha", "match"),
    ("MLA matches or beats GQA", "lm", "mla", "gqa", "match"),
    ("a GDN:attention 3:1 hybrid matches full attention", "lm", "gdn_hybrid_3_1", "gqa", "match"),
    ("KDA:MLA 3:1 matches MLA", "lm", "kda_mla_3_1", "mla", "match"),
    ("NSA matches dense attention", "lm", "nsa", "gqa", "match"),
    ("DSA matches MLA", "lm", "dsa", "mla", "match"),
    ("MSA matches GQA", "lm", "msa", "gqa", "match"),
    ("MQA keeps MHA's recall", "recall", "mqa", "mha", "match"),
    ("GQA keeps MHA's recall", "recall", "gqa", "mha", "match"),
    ("MLA keeps GQA's recall", "recall", "mla", "gqa", "match"),
    ("linear attention (GDN) recalls worse than softmax attention", "recall", "gdn", "gqa", "worse"),
    ("sliding-window attention recalls worse than full attention", "recall", "swa", "gqa", "worse"),
    ("a GDN:attention hybrid restores recall (vs pure GDN)", "recall", "gdn_hybrid_3_1", "gdn", "better"),
    ("a GDN:attention hybrid matches full attention's recall", "recall", "gdn_hybrid_3_1", "gqa", "match"),
    ("an SWA:global hybrid restores recall (vs pure SWA)", "recall", "swa_hybrid_3_1", "swa", "better"),
    ("KDA:MLA 3:1 matches MLA's recall", "recall", "kda_mla_3_1", "mla", "match"),
    ("NSA keeps dense attention's recall", "recall", "nsa", "gqa", "match"),
    ("DSA keeps MLA's recall", "recall", "dsa", "mla", "match"),
    ("MSA keeps GQA's recall", "recall", "msa", "gqa", "match"),
]


def claims_table(results: dict) -> str:
    """Each claim -> supported / contradicted / not distinguishable, with the intervals behind it. LM: validation
    loss (lower is better); recall: MQAR accuracy at the training length and at the longest test length."""
    lm, rc = lm_intervals(results), recall_intervals(results)
    rows = ["| claim | track | figures (mean [95 % interval]) | verdict |", "|---|---|---|---|"]
    for text, track, a, b, says in CLAIMS:
        if track == "lm" and a in lm and b in lm:
            v = verdict(lm[a], lm[b], says, higher_is_better=False)
            rows.append(f"| {text} | LM loss | {a} {lm[a]} vs {b} {lm[b]} | {v} |")
        elif track == "recall" and a in rc and b in rc:
            lens = list(rc[a])
            picks = [results["settings"]["recall"]["seq_len"], lens[-1]]
            for n in dict.fromkeys(str(p) for p in picks):
                v = verdict(rc[a][n], rc[b][n], says)
                rows.append(f"| {text} | MQAR @{n} | {a} {rc[a][n]} vs {b} {rc[b][n]} | {v} |")
    if len(rows) == 2:
        return "(the run has none of the mechanism pairs the claims compare)\n"
    return "\n".join(rows) + "\n"

# ----------------------------------------------------------------------------------------------- plots

def _ema(xs: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


def _style(i: int) -> dict:
    import matplotlib.pyplot as plt
    return dict(color=plt.get_cmap("tab20")(i % 20), linestyle=("-", "--", ":", "-.")[(i // 10) % 4])


def recall_plot(results: dict, out: Path) -> Path | None:
    """MQAR accuracy at the training length against the step (line: mean over seeds; band: the seeds' range),
    and the final accuracy against the test length with its interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs, iv = results.get("recall", {}), recall_intervals(results)
    if not iv:
        return None
    rs = results["settings"]["recall"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, mech in enumerate(iv):
        mine = [r for r in runs.values() if r["mechanism"] == mech]
        steps = mine[0]["curve"]["steps"]
        accs = np.array([r["curve"]["acc"] for r in mine])
        st = _style(i)
        a1.plot(steps, accs.mean(0), label=mech, **st)
        a1.fill_between(steps, accs.min(0), accs.max(0), color=st["color"], alpha=0.15)
        lens = [int(n) for n in iv[mech]]
        mid = [iv[mech][str(n)].mean for n in lens]
        err = [[m - iv[mech][str(n)].lo for n, m in zip(lens, mid)], [iv[mech][str(n)].hi - m for n, m in zip(lens, mid)]]
        a2.errorbar(lens, mid, yerr=err, marker="o", capsize=3, label=mech, **st)
    chance = 1 / rs["vocab"]
    for a in (a1, a2):
        a.axhline(chance, color="grey", linewidth=0.8, linestyle=":")
        a.set(ylabel="MQAR accuracy", ylim=(-0.03, 1.03))
    a1.axhline(1 / rs["kv_pairs"], color="grey", linewidth=0.8, linestyle="--")  # "one of the values in context"
    a1.set(xlabel="training step", title=f"recall track: accuracy at the training length {rs['seq_len']} "
                                         f"({rs['kv_pairs']} pairs)")
    a2.set_xscale("log", base=2)
    a2.axvline(rs["seq_len"], color="grey", linewidth=0.8, linestyle=":")
    a2.set(xlabel="test length (pairs scale with it)", title="final accuracy, 95 % interval over sequences and seeds")
    a1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / RECALL_PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _done(results)
    paths = [p for p in (recall_plot(results, out),) if p is not None]
    if not rows:
        return paths
    # loss curves
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (name, r) in enumerate(rows.items()):
        h, st = r["history"], _style(i)
        a1.plot(h["steps"], _ema(h["lm"]), label=name, **st)
        if h["val_steps"]:
            a1.plot(h["val_steps"], h["val"], "o", color=st["color"], markersize=3)
        a2.plot(h["steps"], _ema(h["mqar"]), label=name, **st)
    a1.set(xlabel="step", ylabel="LM loss (nats/byte)", title="LM: train (EMA) and validation (dots)")
    a2.set(xlabel="step", ylabel="MQAR loss (answer positions)", title="MQAR training loss (EMA)")
    lo = min(min(r["history"]["lm"][len(r["history"]["lm"]) // 4:] or [1]) for r in rows.values())
    a1.set_ylim(max(0, lo - 0.2), lo + 2.5)
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / PLOTS[0])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # accuracy vs length
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (name, r) in enumerate(rows.items()):
        e, st = r["eval"], _style(i)
        a1.plot([int(t) for t in e["mqar"]], list(e["mqar"].values()), marker="o", label=name, **st)
        a2.plot([int(c) for c in e["needle"]], list(e["needle"].values()), marker="o", label=name, **st)
    train_len = results["settings"]["seq_len"]
    for a, title in ((a1, "MQAR accuracy (kv pairs = length / 16)"), (a2, "needle accuracy (context > training)")):
        a.set_xscale("log", base=2)
        a.axvline(train_len, color="grey", linewidth=0.8, linestyle=":")
        a.set(xlabel="sequence length (tokens)", ylabel="accuracy", ylim=(-0.03, 1.03), title=title)
    a1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / PLOTS[1])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # cost vs context (cost model), over every distinct config
    ctx = np.unique(np.logspace(10, 20, 21, base=2).astype(int))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (name, r) in enumerate(rows.items()):
        if r.get("replicate_of"):
            continue
        cfg, st = config_from_json(r["config"]), _style(i)   # as native configs: older results.json too
        a1.plot(ctx, [attention_flops_per_token(cfg, int(c)) for c in ctx], label=name, **st)
        a2.plot(ctx, [kv_read_bytes_per_token(cfg, int(c)) for c in ctx], label=name, **st)
    a1.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="FLOPs per decoded token",
           title="attention FLOPs/token, all layers (cost model)")
    a2.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="bytes",
           title="KV bytes read per decoded token, all layers (bf16)")
    a1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / PLOTS[2])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- report

def write_report(out: Path, with_plots: bool = True) -> Path:
    """report.md (and the PNGs unless with_plots is False: the cheap update after each mechanism)."""
    results = json.loads((out / "results.json").read_text())
    if with_plots:
        plots(results, out)
    s = results["settings"]
    rows = _done(results)
    rs = s.get("recall")
    lines = ["# attnzoo arena", "", f"Machine: {results['machine']}  ",
             f"Corpus: CPython {results['corpus']['python']} standard library sources, "
             f"{results['corpus']['describe']}.", ""]
    if results.get("recall"):
        runs = results["recall"]
        lines += [
            "## Recall track", "",
            f"Small models trained on MQAR alone: {rs['layers']} layers, d_model {rs['hidden']}, {rs['heads']} heads, "
            f"{rs['steps']} steps × {rs['batch_size']} sequences of {rs['seq_len']} tokens with {rs['kv_pairs']} "
            f"key-value pairs (keys and values from {rs['vocab']} each: chance {1 / rs['vocab']:.3f}; filler: "
            f"{rs['noise']}), loss on the answers only, AdamW lr {rs['lr']} cosine, seeds "
            f"{', '.join(str(x) for x in sorted({r['seed'] for r in runs.values()}))}. Tests: {rs['eval_examples']} "
            f"fixed sequences per length, the same for every run; longer lengths keep the pair density. "
            f"Intervals: 95 % bootstrap over test sequences, joined over seeds (their envelope). "
            f"{len(runs)} runs, {sum(r['seconds'] for r in runs.values()) / 60:.1f} min of worker time.", "",
            recall_table(results)]
        if results.get("recall_skipped"):
            lines += ["Not in this track: " + "; ".join(f"{k} ({v})" for k, v in results["recall_skipped"].items())
                      + ".", ""]
        lines += [f"![recall curves]({RECALL_PLOT})", ""]
    if rows:
        lines += [
            "## Language-modelling track", "",
            f"Preset `{results['preset']}`: {s['layers']} layers, d_model {s['hidden']}, {s['heads']} heads of "
            f"{s['head_dim']}, SwiGLU {s['intermediate']}, {s['steps']} steps × ({s['batch_size']} × {s['seq_len']} "
            f"corpus bytes + ~{s['mqar_tokens']} MQAR tokens), AdamW lr {s['lr']} cosine, seed {s['seed']}, device "
            f"{s['device']}. Finished: {len(rows)} of {len(results['mechanisms'])} runs; total time "
            f"{sum(r.get('seconds', 0) for r in rows.values()) / 60:.1f} min.", "",
            table(results),
            "Columns: validation loss in nats per byte on held-out stdlib files; MQAR accuracy on fixed test sets "
            "(length / 16 key-value pairs; lengths above the training length test extrapolation); needle accuracy "
            "(a key-value pair hidden in held-out text longer than the training length, asked at the end); "
            "tokens/s in training (LM + MQAR tokens, forward + backward + optimizer); decode tokens/s through the "
            "engine after a prompt of the given length; KV cache bytes stored per token (bf16; sliding windows and "
            "recurrent states amortised over the context); attention FLOPs per decoded token summed over layers "
            "(core + projections, FFN excluded) from the cost model.", "",
            "![loss curves](loss_curves.png)", "", "![accuracy vs length](accuracy_vs_length.png)", "",
            "![cost vs context](cost_vs_context.png)", ""]
    lines += ["## The claims at this scale", "",
              "Verdicts compare 95 % intervals: overlapping intervals are *not distinguishable*; a claim that one "
              "mechanism matches another is contradicted only by a distinguishable shortfall.", "",
              claims_table(results)]
    notes = [f"- {n}: " + (f"{r['replicate_of']} again with seed {r['seed']} (the seed-to-seed yardstick)"
                           if r.get("replicate_of") else DESCRIPTIONS.get(n, "")) for n, r in rows.items()]
    if notes:
        lines += ["## Mechanisms", ""] + notes + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
