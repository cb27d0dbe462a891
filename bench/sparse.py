"""Select-then-attend on the CPU: DSA, MSA and NSA-style selection vs dense attention, plus a cost model.

    python bench/sparse.py [--quick] [--threads 2] [--dsa-heads 16]

(a) Cost model (attnzoo.ops.sparse.cost) at 1M context with the real configs (DeepSeek-V3.2, GLM-5 / 5.2,
    MiniMax-M3, the NSA paper): FLOPs and KV bytes per token per layer, and the ratios the papers claim.
(b) Measured time per layer, batch 1, fp32, torch forms (attnzoo.ops.sparse), per context length:
    decode  = one new query over a cache of L tokens;
    prefill = a chunk of 64 queries ending at position L (chunked prefill), reported per token.
    "select" is the index branch (score every cached key, pool, top-k), "attend" the attention over the
    selection (plus NSA's window branch), "dense" the same attention over every causal key (attnzoo.ops.attention).
  DSA: absorbed MLA as MQA over the 576-wide latent (values = its first 512 dims), H = --dsa-heads
       (V3.2 has 128), lightning indexer HI 64 x dI 128, top-2048 tokens.
  MSA: GQA H 64 / Hkv 4 / d 128 (MiniMax-M3), index heads 4 x 128, top-16 blocks of 128 per group.
  NSA: GQA H 64 / Hkv 4 / dk 192 / dv 128 (paper), compression l 32 / d 16 by mean pooling (a stand-in
       for the learned MLP), selection 16 blocks of 64 from the paper's p_cmp -> p_slc map, window 512;
       "select" includes the compressed attention (its probabilities are the scores).
  Each sparse output is checked against the reference form (on the last 4 query rows for prefill chunks)
  before anything is timed (FAILED otherwise).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_s  # noqa: E402  (common.py also puts the checkout on sys.path)

from attnzoo.ops.attention import attention  # noqa: E402
from attnzoo.ops.sparse import (  # noqa: E402
    block_sparse_attention_reference,
    block_sparse_attention_torch,
    sparse_attention_reference,
    sparse_attention_torch,
)
from attnzoo.ops.sparse import cost  # noqa: E402
from attnzoo.ops.sparse.select import (  # noqa: E402
    lightning_indexer_scores,
    msa_block_scores,
    msa_select_blocks,
    nsa_block_scores,
    nsa_compression_probs,
    nsa_select_blocks,
    topk_indices,
)

CHUNK = 64  # prefill chunk (queries)
RTOL = 1e-4


# ------------------------------------------------------------------------------------------ (a) model

def fmt(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def cost_tables(context: int) -> None:
    print(f"## (a) Cost model per token per layer at {context:,} tokens of context "
          "(attnzoo.ops.sparse.cost; core = attention + index branch + MLA absorption)\n")
    rows = [(cost.DEEPSEEK_V32, ("mla", "dsa")), (cost.GLM52, ("mla", "dsa", "indexshare")),
            (cost.MINIMAX_M3, ("gqa", "msa")), (cost.NSA_PAPER, ("gqa", "nsa"))]
    print("| model | mechanism | decode core FLOPs | of which index | prefill-avg core FLOPs | decode layer FLOPs "
          "(+proj +ffn) | KV bytes read / decode token |")
    print("|---|---|---|---|---|---|---|")
    for cfg, mechs in rows:
        for m in mechs:
            dec = cost.cost_per_token(m, context, cfg)
            pre = cost.cost_per_token(m, context, cfg, mode="prefill")
            print(f"| {cfg.name} | {m} | {fmt(dec.flops())} | {fmt(dec.parts['index'])} | {fmt(pre.flops())} | "
                  f"{fmt(dec.flops(cost.ALL))} | {fmt(dec.kv_bytes)}B |")
    print("\n### The papers' claims vs this model (baseline / sparse)\n")
    print("| claim | paper | decode core | prefill-avg core | decode +proj | prefill-avg +proj | decode +ffn | "
          "prefill-avg +ffn | bytes (decode) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cl in cost.CLAIMS:
        r = cost.claim_ratios(cl)
        cells = [r.get(k) for k in ("decode core", "prefill core", "decode +proj", "prefill +proj", "decode +ffn",
                                    "prefill +ffn", "decode bytes")]
        paper = "-" if math.isnan(cl.paper) else f"{cl.paper}x"
        print(f"| {cl.what} | {paper} | " + " | ".join("" if c is None else f"{c:.2f}x" for c in cells) + " |")
    print("""
Reading it: the MSA claim (28.4x) is the *prefill-average* attention-core ratio at 2^20 tokens (28.45x here;
decode at 1M gives 30.1x, and adding the layer's projections drops it to 21-25x), so it reproduces only
as a compute ratio of the attention itself, averaged over a 1M-token prefill. IndexShare's 2.9x is not an
attention-core number: with every 4th layer indexing, the core ratio is 3.3-3.6x (it tends to 4x as the
indexer dominates); 2.9x appears once the non-indexer per-token work is included (+proj averaged over a
prefill: 2.92x, or +proj +MoE FFN at decode: 2.88x), and the GLM-5.2 report does not say which, so
"reproduced" here means "consistent with a whole-layer count", not a unique derivation. Our GLM-5.2 row
uses GLM-5's dimensions with F = 4 (GLM-5.2's exact layer schedule is not public in our sources). NSA's
11.6x at 64k is its memory-access table (KV rows read per decode step, 65536 / (4095 + 1024 + 512)) and
reproduces exactly; the paper's measured kernel speedups (9x forward, 6x backward at 64k) are timings,
not modelled. The indexer, not the attention, dominates DSA at 1M (8.7 of 9.0 GFLOP core per GLM-5 layer).
""")


# ------------------------------------------------------------------------------------------ (b) timing

def check(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    if not (bool(got.isfinite().all()) and err <= RTOL):
        raise SystemExit(f"FAILED: {name}: max rel err {err:.2e}")
    return err


class Mech:
    """One mechanism at one context length: select(q) -> indices, attend(q, indices), dense(q)."""
    name: str
    select: Callable[[int], torch.Tensor]
    attend: Callable[[int, torch.Tensor], torch.Tensor]
    dense: Callable[[int], torch.Tensor]
    reference: Callable[[int, torch.Tensor], torch.Tensor]


def dsa(L: int, H: int, g: torch.Generator) -> Mech:
    R, DR, HI, DI, TOPK = 512, 64, 64, 128, 2048
    m = Mech()
    m.name = f"DSA (MLA-MQA H={H}, indexer {HI}x{DI}, top-{TOPK})"
    lat = torch.randn(1, L, 1, R + DR, generator=g)
    k_idx = torch.randn(1, L, DI, generator=g)
    qs = {n: torch.randn(1, n, H, R + DR, generator=g) for n in (1, CHUNK)}
    qi = {n: torch.randn(1, n, HI, DI, generator=g) for n in (1, CHUNK)}
    w = {n: torch.randn(1, n, HI, generator=g) * HI ** -0.5 for n in (1, CHUNK)}
    scale = (128 + DR) ** -0.5

    def select(n: int) -> torch.Tensor:  # the n queries sit at the last n positions (bottom-right)
        return topk_indices(lightning_indexer_scores(qi[n], k_idx, w[n], scale=DI ** -0.5), TOPK)[:, :, None]

    m.select = select
    m.attend = lambda n, idx: sparse_attention_torch(qs[n], lat, lat[..., :R], idx, scale=scale)
    m.dense = lambda n: attention(qs[n], lat, lat[..., :R], causal=True, scale=scale, backend="torch")
    m.reference = lambda n, idx: sparse_attention_reference(qs[n][:, -4:], lat, lat[..., :R], idx[:, -4:], scale=scale)
    return m


def msa(L: int, g: torch.Generator) -> Mech:
    H, HKV, D, DI, BS, TOPB = 64, 4, 128, 128, 128, 16
    m = Mech()
    m.name = f"MSA (GQA {H}/{HKV} d {D}, index {HKV}x{DI}, top-{TOPB} blocks of {BS})"
    k, v = torch.randn(1, L, HKV, D, generator=g), torch.randn(1, L, HKV, D, generator=g)
    k_idx = torch.randn(1, L, DI, generator=g)
    qs = {n: torch.randn(1, n, H, D, generator=g) for n in (1, CHUNK)}
    qi = {n: torch.randn(1, n, HKV, DI, generator=g) for n in (1, CHUNK)}
    m.select = lambda n: msa_select_blocks(msa_block_scores(qi[n], k_idx, BS), TOPB)
    m.attend = lambda n, idx: block_sparse_attention_torch(qs[n], k, v, idx, BS)
    m.dense = lambda n: attention(qs[n], k, v, causal=True, backend="torch")
    m.reference = lambda n, idx: block_sparse_attention_reference(qs[n][:, -4:], k, v, idx[:, -4:], BS)
    return m


def nsa(L: int, g: torch.Generator) -> Mech:
    H, HKV, DK, DV, LC, DC, LS, NSEL, W = 64, 4, 192, 128, 32, 16, 64, 16, 512
    G = H // HKV
    m = Mech()
    m.name = f"NSA-style (GQA {H}/{HKV} dk {DK} dv {DV}; cmp l{LC}/d{DC}, {NSEL} blocks of {LS}, window {W})"
    k, v = torch.randn(1, L, HKV, DK, generator=g), torch.randn(1, L, HKV, DV, generator=g)
    nc = (L - LC) // DC + 1  # compressed keys (cache state: built as blocks complete, not timed)
    k_cmp, v_cmp = (x.unfold(1, LC, DC).mean(-1) for x in (k, v))  # [1, nc, Hkv, d]: windows of LC keys, step DC
    assert k_cmp.shape[1] == nc
    qs = {n: torch.randn(1, n, H, DK, generator=g) for n in (1, CHUNK)}
    nblk = -(-L // LS)

    def select(n: int) -> torch.Tensor:
        p = nsa_compression_probs(qs[n], k_cmp, l=LC, d=DC, kv_len=L)
        # the compressed branch's own output: NSA computes it anyway, so it is timed with the selection
        torch.einsum("btgjc,bcgd->btgjd", p.view(1, n, HKV, G, nc), v_cmp)
        s = nsa_block_scores(p, G=G, l=LC, d=DC, l_sel=LS, num_blocks=nblk)
        return nsa_select_blocks(s, NSEL, block_size=LS, kv_len=L)

    def window(q: torch.Tensor) -> torch.Tensor:  # the last n + W - 1 keys are all a chunk's window can see
        lo = max(0, L - (q.shape[1] + W - 1))
        return attention(q, k[:, lo:], v[:, lo:], causal=True, window_size=(W - 1, 0), backend="torch")

    def attend(n: int, idx: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention_torch(qs[n], k, v, idx, LS) + window(qs[n])

    m.select = select
    m.attend = attend
    m.dense = lambda n: attention(qs[n], k, v, causal=True, backend="torch")
    m.reference = lambda n, idx: (block_sparse_attention_reference(qs[n][:, -4:], k, v, idx[:, -4:], LS)
                                  + attention(qs[n][:, -4:], k, v, causal=True, window_size=(W - 1, 0),
                                              backend="reference"))  # the window on the full cache
    return m


def bench_rows(make: Callable[[int], Mech], sizes: list[int], repeats: int) -> None:
    first = make(sizes[0])
    print(f"### {first.name}\n")
    print("| context | decode select (ms) | decode attend (ms) | decode total (ms) | dense decode (ms) | dense / total "
          "| prefill select (ms/tok) | prefill attend (ms/tok) | prefill total (ms/tok) | dense prefill (ms/tok) "
          "| dense / total | check (rel err) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    del first
    for L in sizes:
        m = make(L)
        with torch.inference_mode():
            errs = []
            for n in (1, CHUNK):
                idx = m.select(n)
                got = m.attend(n, idx)[:, -4:]
                errs.append(check(f"{m.name} L={L} n={n}", got, m.reference(n, idx)))
            cells = []
            for n in (1, CHUNK):
                idx = m.select(n)
                ts = median_s(lambda: m.select(n), repeats=repeats)
                ta = median_s(lambda: m.attend(n, idx), repeats=repeats)
                td = median_s(lambda: m.dense(n), repeats=repeats)
                cells += [ts / n * 1e3, ta / n * 1e3, (ts + ta) / n * 1e3, td / n * 1e3]
        d, p = cells[:4], cells[4:]
        print(f"| {L:,} | {d[0]:.2f} | {d[1]:.2f} | {d[2]:.2f} | {d[3]:.2f} | {d[3] / d[2]:.1f}x | {p[0]:.2f} | "
              f"{p[1]:.2f} | {p[2]:.2f} | {p[3]:.2f} | {p[3] / p[2]:.1f}x | {max(errs):.1e} |", flush=True)
        del m
    print()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short contexts, one repeat (smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dsa-heads", type=int, default=16, help="MLA query heads for the DSA rows (V3.2: 128)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, repeats = ([1024, 2048], 1) if args.quick else ([4096, 16384, 65536], 3)
    print(f"# Select-then-attend benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"- machine: {machine()}")
    print(f"- load average at start: {os.getloadavg()[0]:.2f}\n")
    cost_tables(1 << 20)
    print(f"## (b) CPU time per layer, batch 1, fp32; median of {repeats} after a warm-up; prefill = a chunk of "
          f"{CHUNK} queries ending at the context length\n")
    g = torch.Generator().manual_seed(0)
    bench_rows(lambda L: dsa(L, args.dsa_heads, g), sizes, repeats)
    bench_rows(lambda L: msa(L, g), sizes, repeats)
    bench_rows(lambda L: nsa(L, g), sizes, repeats)


if __name__ == "__main__":
    main()
