"""One GPU check for the H200 (any CUDA GPU): correctness first, then speed vs torch SDPA.

    python bench/gpu_check.py

1. Correctness on small shapes against the reference (fp64 on the GPU): attnzoo's triton
   forward + backward through attention(..., backend="triton"), and paged decode
   (paged_decode_triton). A path that cannot be imported reports "not available".
2. Ceilings measured here: a bf16 8192^3 torch.matmul (TFLOP/s) and a large device copy (GB/s).
3. Causal bf16 attention, d=128, GQA 8:1 (H=32, Hkv=4), batch x T = 16k tokens at T = 1k,
   4k, 16k: forward and backward TFLOP/s for triton and each SDPA backend that runs
   (FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION), % of the matmul peak, ratio vs
   SDPA flash. FLOPs: 4*B*H*T^2*d, halved for causal; backward counted as 2.5x forward.
4. Paged decode, 32 sequences x 8k context: achieved bandwidth (K+V bytes read once) vs the
   copy bandwidth, with SDPA flash decode on contiguous KV for scale.
5. Gated delta rule (attnzoo.ops.delta_rule.triton_kernels, delta_rule_gpu): fp32 checks vs the reference,
   then bf16 chunk forward at T = 8k, 32k (Qwen3-Next GDN: Hk=16, Hv=32, dk=dv=128) and the in-place decode
   step for 32 sequences, next to fla's Triton kernels when `import fla` works.
6. Arena training speed at the gpu preset (bench/arena_speed.py): each mechanism's logits on its default
   (Triton) kernels checked against the torch forms, then 6 training steps: tokens/s, ratio to GQA (target
   >= 0.30), and the preset's projected training time (target: 13 mechanisms + a replicate in 10 minutes).
Times: CUDA events, warm-up first, median of repeats, fresh random inputs (never zeros).
Writes bench/results/gpu_check-<date>-<gpu>.md and .json. Runs in ~3-6 minutes (Triton compiles included).
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py (which puts the checkout on the path)
from common import markdown  # noqa: E402

H, HKV, D = 32, 4, 128
TOKENS = 16384
SIZES = (1024, 4096, 16384)
DECODE = dict(seqs=32, ctx=8192, H=32, Hkv=8, d=128, page=16)
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}  # ||out - ref|| / ||ref||


# ------------------------------------------------------------------ pure helpers (tested on CPU)

def attn_flops(B: int, H: int, T: int, d: int, causal: bool, backward: bool = False, Tk: int | None = None) -> float:
    """Matmul FLOPs of attention: QK^T and PV, 2 * B*H*T*Tk*d each; causal halves; backward = 2.5x forward."""
    f = 4.0 * B * H * T * (T if Tk is None else Tk) * d
    if causal:
        f /= 2
    return f * 2.5 if backward else f


def decode_bytes(seqs: int, ctx: int, Hkv: int, d: int, elem: int) -> float:
    """Fewest bytes a decode step must read: every K and V of every sequence once (q and out are tiny)."""
    return 2.0 * seqs * ctx * Hkv * d * elem


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def result_paths(gpu: str, today: datetime.date, root: Path) -> tuple[Path, Path]:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", gpu).strip("-") or "gpu"
    base = root / f"gpu_check-{today.isoformat()}-{slug}"
    return base.with_suffix(".md"), base.with_suffix(".json")


# ------------------------------------------------------------------ device side

def time_ms(fn: Callable[[], object], reps: int = 10, warmup: int = 3, before: Callable[[], object] | None = None) -> float:
    """Median ms over reps with CUDA events; `before` runs outside the timed region (e.g. clearing grads)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    ts = []
    for _ in range(reps):
        if before:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def ceilings() -> dict:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm = time_ms(lambda: a @ b, reps=20)
    x = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    cp = time_ms(lambda: y.copy_(x), reps=20)
    return {"matmul_tflops": 2 * n**3 / mm / 1e9, "copy_gbs": 2 * x.numel() * 4 / cp / 1e6}


def _triton_attention() -> Callable | None:
    try:
        from attnzoo.ops.attention import attention
        from attnzoo.ops.attention import triton as _t  # noqa: F401  (import error -> not available)
    except Exception:
        return None
    return lambda q, k, v, **kw: attention(q, k, v, backend="triton", **kw)


def _paged_decode() -> Callable | None:
    try:
        from attnzoo.ops.attention.triton import paged_decode_triton
    except Exception:
        return None
    return paged_decode_triton


def qkv(B: int, T: int, h: int, hkv: int, d: int, dtype: torch.dtype, grad: bool = False) -> list[torch.Tensor]:
    return [torch.randn(B, T, n, d, device="cuda", dtype=dtype, requires_grad=grad) for n in (h, hkv, hkv)]


def check_triton(att: Callable | None) -> list[dict]:
    from attnzoo.ops.attention import attention_reference
    rows = []
    for B, T, Tk, h, hkv, causal, window in [(2, 300, 300, 8, 1, True, (-1, -1)), (1, 257, 513, 8, 2, True, (64, -1)),
                                            (2, 129, 129, 4, 4, False, (-1, -1))]:
        name = f"triton B={B} Tq={T} Tk={Tk} H={h}/{hkv} causal={causal} window={window}"
        if att is None:
            rows.append({"check": name, "result": "not available"})
            continue
        try:
            q = torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(B, Tk, hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            g = torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16)
            out = att(q, k, v, causal=causal, window_size=window)
            out.backward(g)
            r = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = attention_reference(*r, causal=causal, window_size=window)
            ref.backward(g.double())
            errs = [rel_err(a, b) for a, b in zip([out, q.grad, k.grad, v.grad], [ref, *(t.grad for t in r)])]
            ok = all(e <= REL_TOL[torch.bfloat16] for e in errs)
            rows.append({"check": name, "result": ("ok" if ok else "FAILED") + " rel err out/dq/dk/dv "
                         + "/".join(f"{e:.1e}" for e in errs)})
        except Exception as e:  # report and go on: the timing rows still say something
            rows.append({"check": name, "result": f"FAILED: {type(e).__name__}: {e}"[:300]})
    return rows


def paged_inputs(seqs: int, ctx: int, h: int, hkv: int, d: int, page: int, dtype: torch.dtype) -> list[torch.Tensor]:
    per = -(-ctx // page)
    pages = torch.randperm(seqs * per, device="cuda").view(seqs, per).to(torch.int32)  # scattered pages
    q = torch.randn(seqs, h, d, device="cuda", dtype=dtype)
    kc, vc = (torch.randn(hkv, seqs * per, page, d, device="cuda", dtype=dtype) for _ in range(2))
    lens = torch.full((seqs,), ctx, device="cuda", dtype=torch.int32)
    return [q, kc, vc, pages, lens]


def check_paged(dec: Callable | None) -> list[dict]:
    name = "paged decode 5 seqs, lens 1..700, H=32/8, d=128, bf16"
    if dec is None:
        return [{"check": name, "result": "not available"}]
    try:
        from attnzoo.ops.attention.paged import paged_attention_reference
        q, kc, vc, table, _ = paged_inputs(5, 700, 32, 8, D, 16, torch.bfloat16)
        lens = torch.tensor([1, 17, 300, 699, 700], device="cuda", dtype=torch.int32)
        out = dec(q, kc, vc, table, lens)
        cu = torch.arange(6, dtype=torch.int32)
        # the reference walks block tables on the host: give it CPU float64 copies
        ref = paged_attention_reference(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), table.cpu(), cu,
                                        lens.cpu())
        e = rel_err(out.cpu(), ref)
        return [{"check": name, "result": ("ok" if e <= REL_TOL[torch.bfloat16] else "FAILED") + f" rel err {e:.1e}"}]
    except Exception as e:
        return [{"check": name, "result": f"FAILED: {type(e).__name__}: {e}"[:300]}]


def check_engine() -> list[dict]:
    """The engine on CUDA: a tiny random decoder (full and sliding attention) generates through the paged
    KV cache, whose decode steps must run the Triton paged-decode kernel, and must give the greedy tokens
    of the contiguous-cache reference generator run on the CPU in fp32."""
    name = "engine on CUDA (paged decode kernel) vs CPU reference, greedy"
    try:
        import importlib
        # importlib, not `import a.b.c as x`: the attention package keeps a `triton` name of its own
        pd = importlib.import_module("attnzoo.ops.attention.triton.paged_decode")
        from attnzoo.engine import LLM, GenerationConfig, SamplingParams, generate
        from attnzoo.models import DecoderLM, ModelConfig
        calls = [0]
        real = pd.paged_decode_triton

        def counted(*a, **k):
            calls[0] += 1
            return real(*a, **k)
        pd.paged_decode_triton = counted
        results = []
        for window in (None, 8):
            torch.manual_seed(0)
            cfg = ModelConfig(architecture="llama", vocab_size=101, hidden_size=128, intermediate_size=256,
                              num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                              sliding_window=window)
            model = DecoderLM(cfg).eval()
            for p in model.parameters():
                p.data.normal_(0, 0.3)  # peaked logits: greedy choices are not near-ties
            g = torch.Generator().manual_seed(1)
            prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (3, 17, 40, 9)]
            refs = [generate(model, p, GenerationConfig(max_tokens=40)) for p in prompts]
            llm = LLM(model, device="cuda", kv_cache_memory=64 << 20, page_size=16)
            outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)
            llm.check_integrity()
            results.append(sum(o.token_ids == r for o, r in zip(outs, refs)))
        pd.paged_decode_triton = real
        ok = all(r == 4 for r in results) and calls[0] > 0
        return [{"check": name, "result": ("ok" if ok else "FAILED") +
                 f": identical sequences full {results[0]}/4, sliding {results[1]}/4; kernel calls {calls[0]}"}]
    except Exception as e:
        return [{"check": name, "result": f"FAILED: {type(e).__name__}: {e}"[:300]}]


def _sdpa(backend: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            if kt.shape[1] != qt.shape[1]:
                try:
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True).transpose(1, 2)
                except RuntimeError:  # backend without GQA: expand KV (the copy is timed too, and noted)
                    G = qt.shape[1] // kt.shape[1]
                    kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    return run


def time_prefill(name: str, fn: Callable, T: int, peak: float) -> dict:
    B = TOKENS // T
    row: dict = {"impl": name, "T": T, "B": B}
    try:
        q, k, v = qkv(B, T, H, HKV, D, torch.bfloat16, grad=True)
        g = torch.randn_like(q)
        with torch.no_grad():
            fwd = time_ms(lambda: fn(q, k, v, causal=True))
        out = fn(q, k, v, causal=True)

        def clear() -> None:
            q.grad = k.grad = v.grad = None
        bwd = time_ms(lambda: out.backward(g, retain_graph=True), before=clear)
    except Exception as e:
        row["note"] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        return row
    ff, fb = attn_flops(B, H, T, D, True), attn_flops(B, H, T, D, True, backward=True)
    row.update(fwd_ms=fwd, fwd_tflops=ff / fwd / 1e9, fwd_pct_peak=100 * ff / fwd / 1e9 / peak,
               bwd_ms=bwd, bwd_tflops=fb / bwd / 1e9, bwd_pct_peak=100 * fb / bwd / 1e9 / peak)
    return row


MLA = dict(seqs=32, ctx=8192, H=128, dqk=576, dv=512, page=64)  # DeepSeek-V3's absorbed decode shape


def mla_decode(copy_gbs: float) -> list[dict]:
    """MLA absorbed decode over a paged latent cache (Triton): checked against the float64 reference on a
    small case, then timed at 32 x 8k with 128 heads; bytes = the latent rows read once."""
    name = "mla_paged_decode_triton"
    try:
        from attnzoo.ops.latent.paged import mla_paged_decode_reference
        from attnzoo.ops.latent.triton_kernels import mla_paged_decode_triton
    except Exception as e:  # noqa: BLE001
        return [{"impl": name, "note": f"not available: {type(e).__name__}"}]

    def inputs(seqs: int, ctx: int, h: int) -> tuple:
        per = -(-ctx // MLA["page"])
        table = torch.randperm(seqs * per, device="cuda").view(seqs, per).to(torch.int32)
        q = torch.randn(seqs, h, MLA["dqk"], device="cuda", dtype=torch.bfloat16)
        cache = torch.randn(seqs * per, MLA["page"], MLA["dqk"], device="cuda", dtype=torch.bfloat16)
        return q, cache, table, torch.full((seqs,), ctx, device="cuda", dtype=torch.int32)

    scale = (128 + 64) ** -0.5
    q, cache, table, lens = inputs(4, 700, 16)
    lens = torch.tensor([1, 63, 400, 700], device="cuda", dtype=torch.int32)
    out = mla_paged_decode_triton(q, cache, table, lens, MLA["dv"], scale)
    ref = mla_paged_decode_reference(q.double().cpu(), cache.double().cpu(), table.cpu(), lens.cpu(), MLA["dv"], scale)
    e = rel_err(out.cpu(), ref)
    if not e <= REL_TOL[torch.bfloat16]:
        return [{"impl": name, "note": f"FAILED check: rel err {e:.1e}; no speed reported"}]
    q, cache, table, lens = inputs(MLA["seqs"], MLA["ctx"], MLA["H"])
    ms = time_ms(lambda: mla_paged_decode_triton(q, cache, table, lens, MLA["dv"], scale), reps=20)
    nbytes = MLA["seqs"] * MLA["ctx"] * MLA["dqk"] * 2
    return [{"impl": name, "ms": ms, "GB/s": nbytes / ms / 1e6, "pct_copy_bw": 100 * nbytes / ms / 1e6 / copy_gbs,
             "note": f"check rel err {e:.1e}"}]


def time_decode(dec: Callable | None, copy_gbs: float) -> list[dict]:
    c = DECODE
    nbytes = decode_bytes(c["seqs"], c["ctx"], c["Hkv"], c["d"], 2)
    rows = []
    if dec is None:
        rows.append({"impl": "paged_decode_triton", "note": "not available"})
    else:
        try:
            args = paged_inputs(c["seqs"], c["ctx"], c["H"], c["Hkv"], c["d"], c["page"], torch.bfloat16)
            ms = time_ms(lambda: dec(*args), reps=20)
            rows.append({"impl": "paged_decode_triton", "ms": ms, "GB/s": nbytes / ms / 1e6,
                         "pct_copy_bw": 100 * nbytes / ms / 1e6 / copy_gbs})
        except Exception as e:
            rows.append({"impl": "paged_decode_triton", "note": f"FAILED: {type(e).__name__}: {e}"[:160]})
    try:  # contiguous KV, for scale: what the best dense kernel gets on the same bytes
        q = torch.randn(c["seqs"], 1, c["H"], c["d"], device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(c["seqs"], c["ctx"], c["Hkv"], c["d"], device="cuda", dtype=torch.bfloat16) for _ in range(2))
        f = _sdpa("FLASH_ATTENTION")
        with torch.no_grad():
            ms = time_ms(lambda: f(q, k, v, causal=False), reps=20)
        rows.append({"impl": "sdpa FLASH (contiguous KV)", "ms": ms, "GB/s": nbytes / ms / 1e6,
                     "pct_copy_bw": 100 * nbytes / ms / 1e6 / copy_gbs})
    except Exception as e:
        rows.append({"impl": "sdpa FLASH (contiguous KV)", "note": f"n/a: {type(e).__name__}"})
    return rows


# ------------------------------------------------------------------ gated delta rule (GDN / KDA)

GDN = dict(B=1, Hk=16, Hv=32, dk=128, dv=128, T=(8192, 32768), chunk=64, decode_seqs=32, pool=64)  # Qwen3-Next


def delta_state_bytes(seqs: int, Hv: int, dk: int, dv: int) -> float:
    """Fewest bytes a delta-rule decode step moves: every fp32 state [Hv, dk, dv] read once and written once."""
    return 2.0 * seqs * Hv * dk * dv * 4


def delta_chunk_flops(B: int, T: int, Hv: int, dk: int, dv: int, chunk: int) -> float:
    """Matmul FLOPs of the chunked WY forward, per (chunk, value head): K K^T, Q K^T and W = T(beta e^g K)
    (2 C^2 dk each), U = T(beta V) and Aqk V_new (2 C^2 dv each), W S, Q S and K^T V_new (2 C dk dv each);
    the C^3/3 triangular solve is left out. Chunks are counted padded (ceil(T / C))."""
    n = B * Hv * -(-T // chunk)
    return n * (2.0 * chunk**2 * (3 * dk + 2 * dv) + 6.0 * chunk * dk * dv)


def delta_rule_gpu(copy_gbs: float) -> list[dict]:
    """attnzoo.ops.delta_rule.triton_kernels on the GPU: fp32 correctness vs delta_rule_reference (float64, on
    the GPU) on small GDN/KDA/varlen/decode cases, then (only if those pass) bf16 timings at Qwen3-Next GDN
    shapes: chunk forward at T = 8k and 32k (B=1, Hk=16, Hv=32, dk=dv=128) and the in-place decode step for 32
    sequences in a 64-slot state pool, each next to fla's Triton kernels when `import fla` works."""
    rows: list[dict] = []
    try:
        from attnzoo.ops.delta_rule.reference import delta_rule_reference
        from attnzoo.ops.delta_rule.triton_kernels import (
            chunk_delta_rule_triton,
            delta_rule_step_triton,
            fused_recurrent_delta_rule_triton,
        )
    except Exception as e:  # noqa: BLE001
        return [{"impl": "delta rule (triton)", "note": f"not available: {type(e).__name__}: {e}"[:200]}]
    dev = "cuda"

    def inputs(B: int, T: int, hk: int, hv: int, dk: int, dv: int, gate: str, dtype: torch.dtype) -> list:
        q, k = (torch.randn(B, T, hk, dk, device=dev, dtype=dtype) for _ in range(2))
        v = torch.randn(B, T, hv, dv, device=dev, dtype=dtype)
        beta = torch.rand(B, T, hv, device=dev).to(dtype)
        shape = (B, T, hv) if gate == "head" else (B, T, hv, dk)
        g = -F.softplus(torch.randn(shape, device=dev)) * 0.5  # log-decays <= 0, fp32 like the model's
        return [q, k, v, g, beta]

    # 1. correctness (fp32 inputs, exact fp32 dots): rel err vs the float64 reference
    tol = 1e-4
    cases = [("chunk GDN B=2 T=300 H=2/4 d=64 C=64", "chunk", "head", (2, 300, 2, 4, 64, 64), None),
             ("chunk KDA B=1 T=257 H=4/4 d=128 C=64", "chunk", "channel", (1, 257, 4, 4, 128, 128), None),
             ("chunk GDN varlen [1,100,0,191] H=16/32 d=128 C=64", "chunk", "head", (1, 292, 16, 32, 128, 128),
              [0, 1, 101, 101, 292]),
             ("recurrent KDA varlen [1,100,0,191] H=2/4 d=128", "recurrent", "channel", (1, 292, 2, 4, 128, 128),
              [0, 1, 101, 101, 292])]
    ok_all = True
    for name, form, gate, shape, cu in cases:
        try:
            q, k, v, g, beta = inputs(*shape, gate, torch.float32)
            n = shape[0] if cu is None else len(cu) - 1
            s0 = torch.randn(n, shape[3], shape[4], shape[5], device=dev) * 0.1
            cu_t = None if cu is None else torch.tensor(cu, device=dev, dtype=torch.int32)
            fn = chunk_delta_rule_triton if form == "chunk" else fused_recurrent_delta_rule_triton
            o, s = fn(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True, cu_seqlens=cu_t)
            ro, rs = delta_rule_reference(*(t.double() for t in (q, k, v, g, beta)), initial_state=s0.double(),
                                          use_qk_l2norm=True, cu_seqlens=cu_t)
            eo, es = rel_err(o, ro), rel_err(s, rs)
            ok = eo <= tol and es <= tol
            rows.append({"impl": f"check {name}", "note": ("ok" if ok else "FAILED") + f" rel err o {eo:.1e} state {es:.1e}"})
        except Exception as e:  # noqa: BLE001
            ok = False
            rows.append({"impl": f"check {name}", "note": f"FAILED: {type(e).__name__}: {e}"[:300]})
        ok_all &= ok
    name = "check decode step KDA, 5 seqs in a 9-slot pool (state_indices, one -1), H=2/4 d=128, 3 steps"
    try:
        idx = torch.tensor([7, 0, -1, 3, 5], device=dev, dtype=torch.int32)
        pool = torch.randn(9, 4, 128, 128, device=dev) * 0.1
        state = pool[idx.clamp_min(0).long()].double()
        worst = 0.0
        for _ in range(3):
            q, k, v, g, beta = (t[:, 0] for t in inputs(5, 1, 2, 4, 128, 128, "channel", torch.float32))
            o = delta_rule_step_triton(q, k, v, g, beta, pool, use_qk_l2norm=True, state_indices=idx)
            ro, state = delta_rule_reference(*(t.double()[:, None] for t in (q, k, v, g, beta)), initial_state=state,
                                             use_qk_l2norm=True)
            live = (idx >= 0).cpu()
            worst = max(worst, rel_err(o.cpu()[live], ro[:, 0].cpu()[live]),
                        rel_err(pool[idx[live.to(dev)].long()].cpu(), state.cpu()[live]))
            if o[2].abs().max().item() != 0:
                worst = float("inf")
        ok = worst <= tol
        rows.append({"impl": name, "note": ("ok" if ok else "FAILED") + f" worst rel err {worst:.1e}"})
    except Exception as e:  # noqa: BLE001
        ok = False
        rows.append({"impl": name, "note": f"FAILED: {type(e).__name__}: {e}"[:300]})
    ok_all &= ok
    if not ok_all:
        rows.append({"impl": "delta rule timings", "note": "skipped: a correctness check failed"})
        return rows

    # 2. timings, bf16 inputs (fp32 gates, fp32 states), l2norm in the kernel
    c = GDN
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        fla_note = ""
    except Exception as e:  # noqa: BLE001
        chunk_gated_delta_rule = fused_recurrent_gated_delta_rule = None
        fla_note = f"fla not installed ({type(e).__name__})"
        rows.append({"impl": "fla", "note": fla_note})

    def fla_call(fn, q, k, *rest, **kw):  # type: ignore[no-untyped-def]
        """fla with native GQA (Hv > Hk) if it takes it, else q/k repeated to Hv heads (the copy is timed)."""
        try:
            return fn(q, k, *rest, **kw)
        except Exception:  # noqa: BLE001
            r = rest[0].shape[2] // q.shape[2]
            return fn(q.repeat_interleave(r, 2), k.repeat_interleave(r, 2), *rest, **kw)

    for T in c["T"]:
        for gate in ("head", "channel"):
            if gate == "channel" and T != c["T"][0]:
                continue
            q, k, v, g, beta = inputs(c["B"], T, c["Hk"], c["Hv"], c["dk"], c["dv"], gate, torch.bfloat16)
            fl = delta_chunk_flops(c["B"], T, c["Hv"], c["dk"], c["dv"], c["chunk"])
            impls = [(f"attnzoo chunk {'GDN' if gate == 'head' else 'KDA'}",
                      lambda: chunk_delta_rule_triton(q, k, v, g, beta, use_qk_l2norm=True, chunk_size=c["chunk"]))]
            if chunk_gated_delta_rule is not None and gate == "head":
                impls.append(("fla chunk_gated_delta_rule", lambda: fla_call(
                    chunk_gated_delta_rule, q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)))
            for name, fn in impls:
                row: dict = {"impl": name, "T": T}
                try:
                    with torch.no_grad():
                        ms = time_ms(fn, reps=5, warmup=2)
                    row.update(ms=ms, Mtok_s=c["B"] * T / ms / 1e3, tflops=fl / ms / 1e9)
                except Exception as e:  # noqa: BLE001
                    row["note"] = f"FAILED: {type(e).__name__}: {e}"[:200]
                rows.append(row)
            del q, k, v, g, beta
            torch.cuda.empty_cache()

    n = c["decode_seqs"]
    nbytes = delta_state_bytes(n, c["Hv"], c["dk"], c["dv"])
    q, k, v, g, beta = (t[:, 0] for t in inputs(n, 1, c["Hk"], c["Hv"], c["dk"], c["dv"], "head", torch.bfloat16))
    pool = torch.randn(c["pool"], c["Hv"], c["dk"], c["dv"], device=dev) * 0.1
    idx = torch.randperm(c["pool"], device=dev)[:n].to(torch.int32)
    dense = pool[idx.long()].clone()
    impls = [("attnzoo step (pool, state_indices)",
              lambda: delta_rule_step_triton(q, k, v, g, beta, pool, use_qk_l2norm=True, state_indices=idx)),
             ("attnzoo step (dense state)",
              lambda: delta_rule_step_triton(q, k, v, g, beta, dense, use_qk_l2norm=True))]
    if fused_recurrent_gated_delta_rule is not None:
        impls.append(("fla fused_recurrent_gated_delta_rule", lambda: fla_call(
            fused_recurrent_gated_delta_rule, q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
            initial_state=dense, output_final_state=True, use_qk_l2norm_in_kernel=True)))
    for name, fn in impls:
        row = {"impl": name, "T": 1}
        try:
            with torch.no_grad():
                ms = time_ms(fn, reps=20)
            row.update(ms=ms, **{"GB/s": nbytes / ms / 1e6, "pct_copy_bw": 100 * nbytes / ms / 1e6 / copy_gbs})
        except Exception as e:  # noqa: BLE001
            row["note"] = f"FAILED: {type(e).__name__}: {e}"[:200]
        rows.append(row)
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on the GPU machine. Nothing was measured.", file=sys.stderr)
        return 2
    torch.manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    gpu = torch.cuda.get_device_name()
    print(f"gpu: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    att, dec = _triton_attention(), _paged_decode()

    checks = check_triton(att) + check_paged(dec) + check_engine()
    print("\n" + markdown(checks, ["check", "result"]), flush=True)
    # no speed for a kernel whose correctness check failed
    if any(c["result"].startswith("FAILED") for c in checks if c["check"].startswith("triton")):
        att = None
    if any(c["result"].startswith("FAILED") for c in checks if c["check"].startswith("paged")):
        dec = None

    ceil = ceilings()
    print(f"\nceilings: bf16 matmul 8192^3 {ceil['matmul_tflops']:.0f} TFLOP/s, "
          f"device copy {ceil['copy_gbs']:.0f} GB/s (read + write)", flush=True)

    impls: list[tuple[str, Callable]] = [("triton", att)] if att is not None else []
    impls += [(f"sdpa {b.split('_')[0]}", _sdpa(b)) for b in SDPA_BACKENDS]
    prefill = []
    for T in SIZES:
        rows = [time_prefill(name, fn, T, ceil["matmul_tflops"]) for name, fn in impls]
        if att is None:
            rows.insert(0, {"impl": "triton", "T": T, "B": TOKENS // T, "note": "not available"})
        base = next((r for r in rows if r["impl"] == "sdpa FLASH" and "fwd_ms" in r), None)
        for r in rows:
            if base is not None and "fwd_ms" in r:
                r["fwd_vs_flash"], r["bwd_vs_flash"] = base["fwd_ms"] / r["fwd_ms"], base["bwd_ms"] / r["bwd_ms"]
        prefill += rows
        torch.cuda.empty_cache()
    cols = ["impl", "T", "B", "fwd_ms", "fwd_tflops", "fwd_pct_peak", "fwd_vs_flash",
            "bwd_ms", "bwd_tflops", "bwd_pct_peak", "bwd_vs_flash", "note"]
    print(f"\ncausal bf16, d={D}, H={H}/Hkv={HKV}, B x T = {TOKENS} (vs_flash > 1: faster than SDPA flash)")
    print(markdown(prefill, cols), flush=True)

    decode = time_decode(dec, ceil["copy_gbs"])
    dcols = ["impl", "ms", "GB/s", "pct_copy_bw", "note"]
    print(f"\ndecode: {DECODE}")
    print(markdown(decode, dcols))
    try:
        mla = mla_decode(ceil["copy_gbs"])
    except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
        mla = [{"impl": "mla_paged_decode_triton", "note": f"FAILED: {type(e).__name__}: {e}"[:200]}]
    print(f"\nMLA decode: {MLA}")
    print(markdown(mla, dcols), flush=True)
    try:
        dr = delta_rule_gpu(ceil["copy_gbs"])
    except Exception as e:  # noqa: BLE001
        dr = [{"impl": "delta rule (triton)", "note": f"FAILED: {type(e).__name__}: {e}"[:200]}]
    drcols = ["impl", "T", "ms", "Mtok_s", "tflops", "GB/s", "pct_copy_bw", "note"]
    print(f"\ngated delta rule: {GDN}")
    print(markdown(dr, drcols), flush=True)

    try:  # every arena contestant's training step at the gpu preset: checked, then timed (bench/arena_speed.py)
        import arena_speed
        arena_rows, arena_text = arena_speed.measure("gpu", steps=6, device="cuda")
    except Exception as e:  # noqa: BLE001
        arena_rows, arena_text = [{"mechanism": "arena", "note": f"FAILED: {type(e).__name__}: {e}"[:200]}], ""
    print(f"\narena training speed: {arena_text}")
    print(markdown(arena_rows), flush=True)

    md_path, json_path = result_paths(gpu, datetime.date.today(), Path(__file__).resolve().parent / "results")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    head = f"# gpu_check {datetime.date.today()} on {gpu}\n\ntorch {torch.__version__}, CUDA {torch.version.cuda}\n\n"
    md_path.write_text(head + markdown(checks, ["check", "result"]) + f"\n\nceilings: {ceil}\n\n"
                       + markdown(prefill, cols) + "\n\n" + markdown(decode, dcols) + f"\n\nMLA decode: {MLA}\n\n"
                       + markdown(mla, dcols) + f"\n\ngated delta rule: {GDN}\n\n" + markdown(dr, drcols)
                       + f"\n\narena training speed: {arena_text}\n\n" + markdown(arena_rows) + "\n")
    json_path.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "checks": checks, "ceilings": ceil,
                                     "prefill": prefill, "decode": decode, "decode_shape": DECODE,
                                     "mla_decode": mla, "mla_shape": MLA, "delta_rule": dr, "delta_rule_shape": GDN,
                                     "arena_speed": arena_rows, "arena_speed_text": arena_text},
                                    indent=1))
    print(f"\nwrote {md_path} and {json_path}")
    return 1 if any("FAILED" in r["result"] for r in checks) or any("FAILED" in str(r.get("note", ""))
                                                                    for r in dr + arena_rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
