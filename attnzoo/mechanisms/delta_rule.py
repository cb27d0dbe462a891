"""Gated delta rule layers: Gated DeltaNet (Qwen3-Next, Qwen3.5; kind gdn) and Kimi Delta Attention (Kimi
Linear, GLM-5.3-Flash; kind kda, channel-wise decay). A recurrent state per sequence instead of a KV cache.

Cost per token and layer, the same at every context:
    projections  2 * D * (in_proj width) + 2 * Hv * dv * D   (+ KDA's low-rank gate 2 * 2 * dk * H * dk)
    conv         2 * conv_dim * K
    state        7 * Hv * dk * dv   (decay S *= g: 1, S^T k: 2, rank-1 update: 2, read-out S^T q: 2)
reading the float32 state plus the conv's last K-1 inputs (bf16).

Layer type "linear_attention"; ModelConfig field `delta_rule` (native checkpoints written before the rename
say "linear": models/native.py reads both). Architectures read here: qwen3_next, qwen3_5 (text, or the text
part of the multimodal checkpoint), kimi_linear (KDA + NoPE MLA). Tensor parallelism splits Gated DeltaNet:
key and value heads (Qwen3-Next packs its projections per key head, so a rank's slice is contiguous), with
them the conv channels, A_log, dt_bias and the recurrent-state pool; out_proj columns. KDA is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from attnzoo.layers.cache_spec import CacheKind
from attnzoo.layers.delta import GatedDeltaNet, KimiDeltaAttention
from attnzoo.mechanisms import ffn, latent
from attnzoo.mechanisms.common import ELEM_BYTES, Tensors, even, hybrid_pattern, take
from attnzoo.mechanisms.registry import Contestant, Family, Ranges, Sharding

if TYPE_CHECKING:
    from attnzoo.arena.mechanisms import Shape
    from attnzoo.distributed import ParallelContext
    from attnzoo.models.config import ModelConfig

KINDS = ("gdn", "kda")


@dataclass
class Config:
    kind: str                 # gdn | kda
    num_k_heads: int
    num_v_heads: int
    k_dim: int
    v_dim: int
    conv_width: int = 4
    gate_lower_bound: float | None = None   # KDA's safe gate (GLM-5.3-Flash: -5)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"delta-rule kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "gdn" and self.gate_lower_bound is not None:
            raise ValueError("gate_lower_bound is KDA's (its safe gate); Gated DeltaNet has none")


def from_hf(raw: dict[str, Any], kind: str, *, num_heads: int | None = None, head_dim: int | None = None,
            safe_gate: bool = False) -> Config:
    """Qwen3-Next / Qwen3.5 (gdn) or Kimi Linear / GLM-5.3-Flash (kda: sizes in linear_attn_config, else
    the flat keys, else num_heads / head_dim). safe_gate: read the gate's lower bound (GLM-5.3-Flash)."""
    if kind == "gdn":
        return Config("gdn", num_k_heads=raw["linear_num_key_heads"], num_v_heads=raw["linear_num_value_heads"],
                      k_dim=raw["linear_key_head_dim"], v_dim=raw["linear_value_head_dim"],
                      conv_width=raw.get("linear_conv_kernel_dim", 4))
    lin = raw.get("linear_attn_config") or {}
    H = lin.get("num_heads", raw.get("linear_num_heads", num_heads))
    d = lin.get("head_dim", raw.get("linear_head_dim", head_dim))
    bound = None
    if safe_gate:
        bound = raw.get("linear_lower_bound", -5.0)
        if lin:
            bound = lin.get("gate_lower_bound", bound)
            bound = -5.0 if bound is None and lin.get("safe_gate", True) else bound
    return Config("kda", num_k_heads=H, num_v_heads=H, k_dim=d, v_dim=d, gate_lower_bound=bound,
                  conv_width=lin.get("short_conv_kernel_size", raw.get("linear_conv_kernel_dim", 4)))


def build(cfg: ModelConfig, idx: int) -> GatedDeltaNet | KimiDeltaAttention:
    c = cfg.delta_rule
    if c.kind == "gdn":
        return GatedDeltaNet(idx, cfg.hidden_size, c.num_k_heads, c.num_v_heads, c.k_dim, c.v_dim, c.conv_width,
                             cfg.rms_norm_eps)
    return KimiDeltaAttention(idx, cfg.hidden_size, c.num_v_heads, c.k_dim, c.conv_width, cfg.rms_norm_eps,
                              gate_lower_bound=c.gate_lower_bound)


def hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int) -> dict[str, torch.Tensor]:
    if cfg.delta_rule.kind == "gdn":
        return _gdn(cfg, tensors, src + "linear_attn.", dst)
    return _kda(tensors, src + "self_attn.", dst)


def _gdn(cfg: ModelConfig, tensors: Tensors, a: str, d: str) -> dict[str, torch.Tensor]:
    """Gated DeltaNet -> one in_proj [q | k | v | z | b | a]. Qwen3.5 stores the four projections apart;
    Qwen3-Next packs them per key head ([q | k | v | z] and [b | a] for each of the Hk groups)."""
    c = cfg.delta_rule
    Hk, dk, dv = c.num_k_heads, c.k_dim, c.v_dim
    r = c.num_v_heads // Hk
    if a + "in_proj_qkvz.weight" in tensors:
        qkvz = tensors[a + "in_proj_qkvz.weight"]
        q, k, v, z = qkvz.view(Hk, 2 * dk + 2 * r * dv, -1).split([dk, dk, r * dv, r * dv], 1)
        b, a_ = take(tensors, a + "in_proj_ba.weight").view(Hk, 2 * r, -1).split([r, r], 1)
        parts = [t.reshape(-1, qkvz.shape[-1]) for t in (q, k, v, z, b, a_)]
    else:
        parts = [take(tensors, a + f"in_proj_{p}.weight") for p in ("qkv", "z", "b", "a")]
    return {d + "in_proj.weight": torch.cat(parts), d + "conv_weight": take(tensors, a + "conv1d.weight")[:, 0],
            d + "A_log": take(tensors, a + "A_log"), d + "dt_bias": take(tensors, a + "dt_bias"),
            d + "norm_weight": take(tensors, a + "norm.weight"), d + "out_proj.weight": take(tensors, a + "out_proj.weight")}


def _kda(tensors: Tensors, a: str, d: str) -> dict[str, torch.Tensor]:
    """Kimi Delta Attention -> one in_proj [q | k | v | b | f_a | g_a]. Moonshot's checkpoints (and
    transformers' save_pretrained) keep three convs and the forget gate's projections beside the others;
    transformers' in-memory module has one conv and a forget_gate submodule: both are accepted."""
    fg = a + ("forget_gate." if a + "forget_gate.f_a_proj.weight" in tensors else "")
    conv = (take(tensors, a + "conv1d.weight") if a + "conv1d.weight" in tensors else
            torch.cat([take(tensors, a + f"{p}_conv1d.weight") for p in "qkv"]))
    names = [a + "q_proj", a + "k_proj", a + "v_proj", a + "b_proj", fg + "f_a_proj", a + "g_a_proj"]
    return {d + "in_proj.weight": torch.cat([take(tensors, n + ".weight") for n in names]),
            d + "f_b_proj.weight": take(tensors, fg + "f_b_proj.weight"),
            d + "g_b_proj.weight": take(tensors, a + "g_b_proj.weight"),
            d + "A_log": take(tensors, fg + "A_log").reshape(-1),
            d + "dt_bias": take(tensors, fg + "dt_bias").reshape(-1),
            d + "conv_weight": conv[:, 0],
            d + "norm_weight": take(tensors, a + "o_norm.weight"), d + "o_proj.weight": take(tensors, a + "o_proj.weight")}


def cost(cfg: ModelConfig, idx: int, context: int) -> tuple[float, float]:
    """(FLOPs, bytes read) of one delta-rule layer for one token; see the module docstring."""
    c, D = cfg.delta_rule, cfg.hidden_size
    Hk, Hv, dk, dv, K = c.num_k_heads, c.num_v_heads, c.k_dim, c.v_dim, c.conv_width
    conv_dim = 2 * Hk * dk + Hv * dv
    if c.kind == "gdn":
        proj = 2 * D * (conv_dim + Hv * dv + 2 * Hv) + 2 * Hv * dv * D
    else:
        proj = 2 * D * (conv_dim + Hv + 2 * dk) + 2 * 2 * dk * Hv * dk + 2 * Hv * dv * D
    flops = proj + 2 * conv_dim * K + 7 * Hv * dk * dv
    return float(flops), float(Hv * dk * dv * 4 + conv_dim * (K - 1) * ELEM_BYTES)


# ---- transformers configs --------------------------------------------------------------------------------
def _qwen(raw: dict[str, Any], moe: ffn.Config | None) -> dict[str, Any]:
    """Qwen3-Next / Qwen3.5: GDN with a full (gated GQA) layer every full_attention_interval layers."""
    n, interval = raw["num_hidden_layers"], raw.get("full_attention_interval", 4)
    out = dict(delta_rule=from_hf(raw, "gdn"), attn_output_gate=True, qk_norm=True, sliding_window=None,
               layer_types=raw.get("layer_types") or [
                   "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)])
    if moe is not None:
        skip, step = set(raw.get("mlp_only_layers") or []), raw.get("decoder_sparse_step", 1)
        out.update(moe=moe, mlp_layer_types=["sparse" if i not in skip and (i + 1) % step == 0 else "dense"
                                             for i in range(n)])
    return out


def qwen3_5(raw: dict[str, Any]) -> dict[str, Any]:
    return {**_qwen(raw, None), "architecture": "qwen3_5"}


def kimi_linear(raw: dict[str, Any]) -> dict[str, Any]:
    """Kimi Linear: KDA with NoPE MLA on the layers its linear_attn_config lists (1-indexed; transformers'
    fallback pattern without them is not the checkpoint's), DeepSeek-style MoE."""
    n, lin = raw["num_hidden_layers"], raw.get("linear_attn_config") or {}
    full = set(lin.get("full_attn_layers") or [])
    # Kimi's MLA has a full-rank query and always rotates interleaved pairs
    mla = replace(latent.from_hf(raw, q_lora_rank=None), rope_interleave=True)
    out = dict(delta_rule=from_hf(raw, "kda"), attention_type="mla", mla=mla, head_dim=mla.qk_rope_head_dim,
               use_rope=False,  # NoPE MLA: position comes from the KDA layers' conv and decay
               sliding_window=None, moe=ffn.kimi_moe(raw),
               layer_types=raw.get("layer_types") or [
                   "full_attention" if i + 1 in full else "linear_attention" for i in range(n)])
    if out["moe"] is not None:
        first = raw.get("first_k_dense_replace", 1)
        out["mlp_layer_types"] = raw.get("mlp_layer_types") or ["dense" if i < first else "sparse" for i in range(n)]
    return out


# ---- tensor parallelism (Gated DeltaNet; see the module docstring) -----------------------------------------
def shard_ranges(rest: str, shape: tuple[int, ...], cfg: ModelConfig, ctx: ParallelContext, idx: int
                 ) -> tuple[int, Ranges] | None:
    part, _, leaf = rest.rpartition(".")
    proj, c = part.rsplit(".", 1)[-1], cfg.delta_rule
    if not part.startswith("linear_attn"):
        return None
    if rest in ("linear_attn.A_log", "linear_attn.dt_bias") or proj in (
            "in_proj_qkvz", "in_proj_ba", "in_proj_z", "in_proj_b", "in_proj_a"):
        return 0, even(ctx, shape[0])             # per head; Qwen3-Next packs per key head: a contiguous slice
    if proj in ("in_proj_qkv", "conv1d"):          # [q | k | v] channels
        return 0, even(ctx, c.num_k_heads * c.k_dim, c.num_k_heads * c.k_dim, c.num_v_heads * c.v_dim)
    if proj == "out_proj":
        return 1, even(ctx, shape[1])
    return None


def shard_problems(cfg: ModelConfig, layers: list[int], n: int) -> list[str]:
    c = cfg.delta_rule
    if c.num_k_heads % n or c.num_v_heads % n:
        return [f"linear_num_key_heads {c.num_k_heads} and linear_num_value_heads {c.num_v_heads}"]
    return []


# ---- the arena ----------------------------------------------------------------------------------------------
def _arena_gdn(s: Shape) -> Config:
    # Qwen3-Next's layout: twice as many value heads as key heads
    return Config(kind="gdn", num_k_heads=max(1, s.heads // 2), num_v_heads=s.heads, k_dim=s.head_dim,
                  v_dim=s.head_dim, conv_width=4)


def gdn_hybrid_3_1(s: Shape) -> dict[str, Any]:
    """Qwen3-Next's pattern: three GDN layers, then one full (GQA) attention layer."""
    return dict(num_kv_heads=s.kv_heads, delta_rule=_arena_gdn(s),
                layer_types=hybrid_pattern(s.layers, 3, "linear_attention", "full_attention"))


def kda_mla_3_1(s: Shape) -> dict[str, Any]:
    """Kimi Linear's pattern: three KDA layers, then one MLA layer without positional encoding (NoPE: the
    KDA layers' conv and decay carry position)."""
    kda = Config(kind="kda", num_k_heads=s.heads, num_v_heads=s.heads, k_dim=s.head_dim, v_dim=s.head_dim,
                 conv_width=4)
    return dict(delta_rule=kda, use_rope=False, **latent.arena_fields(s),
                layer_types=hybrid_pattern(s.layers, 3, "linear_attention", "full_attention"))


FAMILY = Family(
    "delta_rule", title="gated delta rule", config=Config, field="delta_rule", layer_types=("linear_attention",),
    mechanisms=KINDS, kind=lambda cfg, idx: cfg.delta_rule.kind, build=build, hf_weights=hf_weights, cost=cost,
    readers={"qwen3_next": lambda raw: _qwen(raw, ffn.qwen_moe(raw)), "qwen3_5": qwen3_5, "qwen3_5_text": qwen3_5,
             "kimi_linear": kimi_linear},
    sharding=Sharding(shard_ranges, columns=("in_proj",), rows=("out_proj",), problems=shard_problems,
                      local=lambda c, n: replace(c, num_k_heads=c.num_k_heads // n, num_v_heads=c.num_v_heads // n),
                      refuse=lambda cfg: "Kimi Delta Attention" if cfg.delta_rule.kind == "kda" else None),
    cache_kinds=(CacheKind.STATE,),
    contestants=(
        Contestant("gdn", lambda s: dict(num_kv_heads=s.kv_heads, delta_rule=_arena_gdn(s),
                                         layer_types=["linear_attention"] * s.layers), "Gated DeltaNet (linear)"),
        Contestant("gdn_hybrid_3_1", gdn_hybrid_3_1, "GDN:attention 3:1"),
        Contestant("kda_mla_3_1", kda_mla_3_1, "KDA:MLA 3:1 (NoPE MLA)")))
