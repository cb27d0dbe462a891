"""MLA (DeepSeek-V3): KV-cache bytes per token, and absorbed vs expanded decode on the CPU.

    python bench/mla.py [--quick]

(a) Bytes one token costs per layer in bf16, from the cache specs (attnzoo.layers.cache_spec): MLA's
576-wide latent vs GQA / MHA layers of DeepSeek-V3's width (hidden 7168, 128 heads).
(b) One decode token of one layer, batch 1, fp32, starting from the cached latent [c_kv | k_pe]:
- absorbed: fold W_UK into the query, MQA over the 576-wide paged latent (mla_paged_decode_torch), W_UV
  on the 512-wide output;
- expanded: up-project every cached latent to per-head K/V (c_kv @ W_UKV: 512 -> H * (dn + dv)),
  then ordinary attention (SDPA).
DeepSeek-V3 head dims (dn 128, dr 64, dv 128, rank 512) with H = 16 heads instead of 128 so it runs on
2 cores; both forms are checked against each other before they are timed (FAILED otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_s  # noqa: E402  (common.py also puts the checkout on sys.path)

from attnzoo.layers.cache_spec import FullKV, LatentKV  # noqa: E402
from attnzoo.engine.cache_tensors import CacheTensors  # noqa: E402
from attnzoo.engine.paged_cache import PagedKVCache  # noqa: E402
from attnzoo.ops.latent.paged import mla_paged_decode_torch  # noqa: E402

R, DN, DR, DV, PAGE = 512, 128, 64, 128, 64
SCALE = (DN + DR) ** -0.5 * 1.3689 ** 2  # DeepSeek-V3's yarn mscale (docs/mechanisms/latent.md §2)
RTOL = 1e-4


def bytes_table() -> None:
    bf16 = 2
    rows = [("MLA latent (kv_lora_rank 512 + rope 64)", LatentKV(R + DR)),
            ("GQA 8 KV heads x 128", FullKV(8, 128)),
            ("MHA 128 heads x (128 + 128)", FullKV(128, 128)),
            ("MLA expanded K/V (128 x (192 + 128))", FullKV(128, DN + DR, DV))]
    mla = rows[0][1].bytes_per_token(bf16)
    print("## (a) KV cache per token per layer, bf16\n")
    print("| cache | bytes / token / layer (spec) | measured in the engine's page pool | vs MLA |")
    print("|---|---|---|---|")
    for name, spec in rows:
        n = spec.bytes_per_token(bf16)
        # the engine's own allocation: one layer, 8 pages of PAGE tokens, bf16
        layout = PagedKVCache([spec], num_pages=8, page_size=PAGE, enable_prefix_caching=False).layout
        g = CacheTensors([spec], layout, torch.bfloat16).groups[0]
        measured = g.nbytes // (8 * PAGE)
        if measured != n:
            raise SystemExit(f"FAILED: {name}: the pool holds {measured} bytes per token, the spec says {n}")
        print(f"| {name} | {n:,} | {measured:,} | {n / mla:.1f}x |")
    print()


def decode_row(L: int, H: int, repeats: int) -> str:
    g = torch.Generator().manual_seed(L)
    pages = -(-L // PAGE)
    cache = torch.randn(pages, PAGE, R + DR, generator=g)   # [c_kv | k_pe] rows (post-norm, post-RoPE)
    table = torch.arange(pages, dtype=torch.int32)[None]
    lens = torch.tensor([L], dtype=torch.int32)
    w_ukv = torch.randn(H, DN + DV, R, generator=g) * R ** -0.5   # kv_b_proj.weight.view(H, dn + dv, r)
    w_uk, w_uv = w_ukv[:, :DN], w_ukv[:, DN:]
    q_nope, q_pe = torch.randn(H, DN, generator=g), torch.randn(H, DR, generator=g)

    def absorbed() -> torch.Tensor:
        q_lat = torch.einsum("hd,hdr->hr", q_nope, w_uk)                       # absorb W_UK into q
        o_lat = mla_paged_decode_torch(torch.cat([q_lat, q_pe], -1)[None], cache, table, lens, R, SCALE)[0]
        return torch.einsum("hr,hvr->hv", o_lat, w_uv)                         # absorb W_UV on the way out

    def expanded() -> torch.Tensor:
        lat = cache.view(-1, R + DR)[:L]           # pages are in order here, so the latent needs no gather
        kv = (lat[:, :R] @ w_ukv.view(H * (DN + DV), R).T).view(L, H, DN + DV).transpose(0, 1)
        k = torch.cat([kv[..., :DN], lat[None, :, R:].expand(H, L, DR)], -1)  # k_pe shared by all heads
        q = torch.cat([q_nope, q_pe], -1)
        return F.scaled_dot_product_attention(q[:, None], k, kv[..., DN:], scale=SCALE)[:, 0]

    with torch.inference_mode():
        a, e = absorbed(), expanded()
        err = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
        if not (a.isfinite().all() and err <= RTOL):
            return f"| {L:,} | FAILED (rel err {err:.2e}) | | | |"
        ta = median_s(absorbed, repeats=repeats)
        te = median_s(expanded, repeats=repeats)
    flops_e = 2 * L * R * H * (DN + DV)  # the up-projection dominates the expanded form
    return (f"| {L:,} | {ta * 1e3:.2f} | {te * 1e3:.2f} ({flops_e / te / 1e9:.0f} GFLOP/s on W_UKV) | "
            f"{te / ta:.1f}x | {err:.1e} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds (smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, repeats = ([256, 1024], 1) if args.quick else ([1024, 8192, 32768], 3)
    print(f"# MLA benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"- machine: {machine()}")
    # Many small ops: with another job on a core, 2-thread barriers stall (tiny matmuls take ~100 ms);
    # the load average says whether that happened. --threads 1 is robust to it.
    print(f"- load average at start: {os.getloadavg()[0]:.2f}\n")
    bytes_table()
    print(f"## (b) decode time per token per layer: H={args.heads}, dn {DN}, dr {DR}, dv {DV}, rank {R}, "
          f"batch 1, fp32, page {PAGE}; median of {repeats} after a warm-up\n")
    print("| cached tokens | absorbed (ms) | expanded (ms) | expanded / absorbed | max rel diff |")
    print("|---|---|---|---|---|")
    for L in sizes:
        print(decode_row(L, args.heads, repeats), flush=True)


if __name__ == "__main__":
    main()
