"""Per-token cost model of dense and select-then-attend attention (FLOPs and KV bytes read).

Counts one layer, one new token that sees `p` keys (itself included):
  "attn"    scores + weighted values over the keys actually attended: 2 * H * n * (dqk + dv)
            (MLA / DSA in the absorbed MQA form: dqk = kv_lora_rank + rope = 576, dv = kv_lora_rank = 512)
  "index"   the selection cost: DSA lightning indexer 2 * HI * p * (dI + 1) (dots + head weighting),
            MSA index branch 2 * HI * p * dI, NSA compressed attention 2 * H * n_cmp * (dk + dv)
            (its probabilities are the selection scores; it is also an output branch)
  "absorb"  MLA weight absorption per token: 2 * H * (dn * r + r * dv)
  "proj"    the layer's linear projections (q / kv / o and the index branch's own projections)
  "ffn"     the active FFN (MoE) FLOPs per layer, 2 * active params, averaged over the model's layers
Not counted: softmax / exp, top-k and max-pool comparisons, norms, RoPE, NSA's compression MLP and
gates (small or unknown). Selected counts: DSA n = min(p, topk); MSA n = min(p, blocks * block) per
group; NSA n_cmp = floor((p - l) / d) + 1 (p >= l), selection min(p, n * l'), window min(p, w).
IndexShare runs the indexer on 1 of every F layers: its index and index-projection terms are / F.
mode="decode": the token at position p = context; mode="prefill": the mean over p = 1 .. context
(total prefill cost / context). KV bytes: cache bytes read per decode token (indexer keys included).
Each mechanism's terms are one function (`gqa_terms`, `mla_terms`, ...); `cost_per_token` takes one, or a
name from `TERMS` (the papers' mechanisms, for the claims and the bench).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

CORE = ("attn", "index", "absorb")
LAYER = ("attn", "index", "absorb", "proj")
ALL = ("attn", "index", "absorb", "proj", "ffn")


@dataclass(frozen=True)
class CostShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int = 0  # GQA / MSA / NSA
    head_dim: int = 0  # dqk (GQA / MSA / NSA)
    v_head_dim: int = 0  # dv (GQA / MSA / NSA; MLA's per-head dv)
    q_lora_rank: int = 0  # MLA
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    index_heads: int = 0  # DSA / MSA index branch
    index_dim: int = 0
    index_topk: int = 0  # DSA tokens
    index_block: int = 0  # MSA
    index_topk_blocks: int = 0
    index_share: int = 1  # IndexShare F (1 = every layer has an indexer)
    nsa_l: int = 0
    nsa_d: int = 0
    nsa_l_sel: int = 0
    nsa_n: int = 0
    nsa_w: int = 0
    ffn_flops: float = 0.0  # 2 * active FFN params per layer (model average)
    bytes_per_elem: float = 2.0  # bf16 cache


def _moe_ffn_flops(hidden: int, layers: int, dense_layers: int, dense_inter: int, experts: int, inter: int,
                   shared_inter: int) -> float:
    """2 * active SwiGLU params per layer averaged over layers (3 matrices per expert, router ignored)."""
    moe = 3 * hidden * (experts * inter + shared_inter)
    dense = 3 * hidden * dense_inter
    return 2 * (dense_layers * dense + (layers - dense_layers) * moe) / layers


# Real configs (docs/mechanisms/sparse.md §9; transformers' config defaults equal the released models).
DEEPSEEK_V32 = CostShape(
    "DeepSeek-V3.2", hidden=7168, layers=61, heads=128, v_head_dim=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, index_heads=64, index_dim=128, index_topk=2048,
    ffn_flops=_moe_ffn_flops(7168, 61, 3, 18432, 8, 2048, 2048))
GLM5 = CostShape(
    "GLM-5", hidden=6144, layers=78, heads=64, v_head_dim=256, q_lora_rank=2048, kv_lora_rank=512,
    qk_nope_head_dim=192, qk_rope_head_dim=64, index_heads=32, index_dim=128, index_topk=2048,
    ffn_flops=_moe_ffn_flops(6144, 78, 3, 12288, 8, 2048, 2048))
GLM52 = replace(GLM5, name="GLM-5.2 (GLM-5 dims, IndexShare F=4)", index_share=4)
MINIMAX_M3 = CostShape(
    "MiniMax-M3", hidden=6144, layers=60, heads=64, kv_heads=4, head_dim=128, v_head_dim=128, index_heads=4,
    index_dim=128, index_block=128, index_topk_blocks=16,
    ffn_flops=_moe_ffn_flops(6144, 60, 3, 12288, 4, 3072, 3072))
NSA_PAPER = CostShape(
    "NSA paper (27B MoE)", hidden=2560, layers=30, heads=64, kv_heads=4, head_dim=192, v_head_dim=128,
    nsa_l=32, nsa_d=16, nsa_l_sel=64, nsa_n=16, nsa_w=512)
CONFIGS = {c.name: c for c in (DEEPSEEK_V32, GLM5, GLM52, MINIMAX_M3, NSA_PAPER)}


@dataclass(frozen=True)
class Cost:
    parts: dict[str, float]  # FLOPs per token per layer by term
    kv_bytes: float  # cache bytes read per token per layer

    def flops(self, include: tuple[str, ...] = CORE) -> float:
        return float(sum(self.parts.get(k, 0.0) for k in include))


Terms = Callable[[np.ndarray, CostShape], tuple[dict[str, np.ndarray | float], np.ndarray]]


def _gqa_proj(c: CostShape) -> float:
    dqk, dv = c.head_dim, c.v_head_dim
    return 2 * c.hidden * (c.heads * dqk + c.kv_heads * (dqk + dv)) + 2 * c.heads * dv * c.hidden


def gqa_terms(p: np.ndarray, c: CostShape) -> tuple[dict[str, np.ndarray | float], np.ndarray]:
    """FLOP terms and KV bytes of a token that sees p keys (vectorised over p): softmax attention (GQA)."""
    H, dqk, dv, Hkv = c.heads, c.head_dim, c.v_head_dim, c.kv_heads
    return {"attn": 2 * H * p * (dqk + dv), "index": np.zeros_like(p), "proj": _gqa_proj(c), "ffn": c.ffn_flops}, \
        p * Hkv * (dqk + dv) * c.bytes_per_elem


def msa_terms(p: np.ndarray, c: CostShape) -> tuple[dict[str, np.ndarray | float], np.ndarray]:
    """MSA: GQA over the selected blocks of its group, plus the index branch over every key."""
    H, dqk, dv, Hkv, eb = c.heads, c.head_dim, c.v_head_dim, c.kv_heads, c.bytes_per_elem
    n = np.minimum(p, c.index_block * c.index_topk_blocks)
    HI, dI = c.index_heads, c.index_dim
    terms = {"attn": 2 * H * n * (dqk + dv), "index": 2 * HI * p * dI,
             "proj": _gqa_proj(c) + 2 * c.hidden * (HI * dI + dI), "ffn": c.ffn_flops}
    return terms, p * dI * eb + Hkv * n * (dqk + dv) * eb


def nsa_terms(p: np.ndarray, c: CostShape) -> tuple[dict[str, np.ndarray | float], np.ndarray]:
    """NSA: compressed attention (the selection scores), selected blocks and the window."""
    H, D, dqk, dv, Hkv = c.heads, c.hidden, c.head_dim, c.v_head_dim, c.kv_heads
    n_cmp = np.where(p >= c.nsa_l, (p - c.nsa_l) // c.nsa_d + 1, 0)
    n_rest = np.minimum(p, c.nsa_n * c.nsa_l_sel) + np.minimum(p, c.nsa_w)
    # separate K/V per branch (paper): 3x the k/v projections, plus the 3-way gate
    proj = 2 * D * (H * dqk + 3 * Hkv * (dqk + dv)) + 2 * H * dv * D + 2 * D * 3 * H
    terms = {"attn": 2 * H * n_rest * (dqk + dv), "index": 2 * H * n_cmp * (dqk + dv), "proj": proj,
             "ffn": c.ffn_flops}
    return terms, Hkv * (n_cmp + n_rest) * (dqk + dv) * c.bytes_per_elem


def _mla_parts(c: CostShape) -> tuple[float, float]:
    """(projections, absorption) of MLA's absorbed form."""
    H, D, r, dr, dn, dv = c.heads, c.hidden, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
    q_proj = 2 * D * c.q_lora_rank + 2 * c.q_lora_rank * H * (dn + dr) if c.q_lora_rank else 2 * D * H * (dn + dr)
    return q_proj + 2 * D * (r + dr) + 2 * H * dv * D, 2 * H * (dn * r + r * dv)


def mla_terms(p: np.ndarray, c: CostShape) -> tuple[dict[str, np.ndarray | float], np.ndarray]:
    """MLA, absorbed: MQA over the latent (scores over r + dr, values over r)."""
    r, dr = c.kv_lora_rank, c.qk_rope_head_dim
    proj, absorb = _mla_parts(c)
    return {"attn": 2 * c.heads * p * (2 * r + dr), "index": np.zeros_like(p), "absorb": absorb, "proj": proj,
            "ffn": c.ffn_flops}, p * (r + dr) * c.bytes_per_elem


def dsa_terms(p: np.ndarray, c: CostShape, share: int = 1) -> tuple[dict[str, np.ndarray | float], np.ndarray]:
    """DSA: absorbed MLA over the top-k keys plus the lightning indexer over every key (on 1 of every
    `share` layers with IndexShare)."""
    H, D, r, dr = c.heads, c.hidden, c.kv_lora_rank, c.qk_rope_head_dim
    proj, absorb = _mla_parts(c)
    HI, dI, F = c.index_heads, c.index_dim, share
    n = np.minimum(p, c.index_topk)
    idx_proj = 2 * (c.q_lora_rank or D) * HI * dI + 2 * D * dI + 2 * D * HI
    terms = {"attn": 2 * H * n * (2 * r + dr), "index": 2 * HI * p * (dI + 1) / F, "absorb": absorb,
             "proj": proj + idx_proj / F, "ffn": c.ffn_flops}
    return terms, p * dI * c.bytes_per_elem / F + n * (r + dr) * c.bytes_per_elem


def indexshare_terms(p: np.ndarray, c: CostShape) -> tuple[dict[str, np.ndarray | float], np.ndarray]:
    return dsa_terms(p, c, c.index_share)


# the mechanisms of the papers' claims by name (the claims, the bench); a family prices itself with its own
# terms function (attnzoo/mechanisms/), so a new one adds nothing here
TERMS: dict[str, Terms] = {"gqa": gqa_terms, "mla": mla_terms, "dsa": dsa_terms, "indexshare": indexshare_terms,
                           "msa": msa_terms, "nsa": nsa_terms}


def cost_per_token(mechanism: str | Terms, context: int, config: CostShape | str, *, mode: str = "decode") -> Cost:
    """Cost of one token per layer; see the module docstring for what each term counts. mechanism: a name in
    TERMS or a terms function."""
    if isinstance(mechanism, str) and mechanism not in TERMS:
        raise ValueError(f"unknown mechanism {mechanism!r}; known: {', '.join(TERMS)}")
    terms_of = TERMS[mechanism] if isinstance(mechanism, str) else mechanism
    c = CONFIGS[config] if isinstance(config, str) else config
    if mode == "decode":
        p = np.array([float(context)])
    elif mode == "prefill":
        p = np.arange(1, context + 1, dtype=np.float64)
    else:
        raise ValueError(f"mode must be 'decode' or 'prefill', got {mode!r}")
    terms, kv = terms_of(p, c)
    parts = {k: float(np.mean(np.broadcast_to(v, p.shape))) for k, v in terms.items()}
    return Cost(parts, float(np.mean(kv)))


def flops_per_token(mechanism: str | Terms, context: int, config: CostShape | str, *, mode: str = "decode",
                    include: tuple[str, ...] = CORE) -> float:
    """FLOPs of one token in one layer (default: the attention core: attn + index + absorb)."""
    return cost_per_token(mechanism, context, config, mode=mode).flops(include)


def kv_bytes_per_token(mechanism: str | Terms, context: int, config: CostShape | str) -> float:
    """KV-cache bytes one decode token reads in one layer."""
    return cost_per_token(mechanism, context, config).kv_bytes


# ------------------------------------------------------------------------------------- the claims

@dataclass(frozen=True)
class Claim:
    what: str
    paper: float
    config: CostShape
    sparse: str
    baseline: str
    context: int
    metric: str  # "flops" or "bytes"


CLAIMS = (
    Claim("MSA vs GQA compute at 1M (MiniMax-M3)", 28.4, MINIMAX_M3, "msa", "gqa", 1 << 20, "flops"),
    Claim("IndexShare (F=4) vs DSA FLOPs/token at 1M (GLM-5.2)", 2.9, GLM52, "indexshare", "dsa", 1 << 20, "flops"),
    Claim("NSA vs full decode memory access at 64k (NSA paper, Table 4)", 11.6, NSA_PAPER, "nsa", "gqa", 1 << 16,
          "bytes"),
    Claim("DSA vs dense MLA at 1M (DeepSeek-V3.2; no single number claimed)", float("nan"), DEEPSEEK_V32, "dsa",
          "mla", 1 << 20, "flops"),
)


def claim_ratios(cl: Claim) -> dict[str, float]:
    """baseline / sparse under several accountings: decode vs prefill-average, attention core vs the whole
    layer (+ projections) vs + FFN."""
    if cl.metric == "bytes":
        return {"decode bytes": kv_bytes_per_token(cl.baseline, cl.context, cl.config)
                / kv_bytes_per_token(cl.sparse, cl.context, cl.config)}
    out = {}
    for mode in ("decode", "prefill"):
        b = cost_per_token(cl.baseline, cl.context, cl.config, mode=mode)
        s = cost_per_token(cl.sparse, cl.context, cl.config, mode=mode)
        for label, inc in (("core", CORE), ("+proj", LAYER), ("+ffn", ALL)):
            out[f"{mode} {label}"] = b.flops(inc) / s.flops(inc)
    return out
