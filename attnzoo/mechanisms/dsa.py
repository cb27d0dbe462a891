"""DeepSeek Sparse Attention: MLA whose queries attend only the top-k keys a lightning indexer picks
(DeepSeek-V3.2, GLM-5 with IndexShare's shared layers); GLM-5.3-Flash's variant scores pools of k keys
(index_kpool) on NoPE MLA. Refines MLA: a model that sets `dsa` (and `mla`) has DSA on its full layers.

Architectures read here: deepseek_v32, glm_moe_dsa, glm5_next (GLM-5.3-Flash, text: KDA + k-pool DSA + mHC).
Tensor parallelism: MLA's split; the indexer replicated (every rank scores and selects the same top-k: a split
indexer would need an all-reduce of the scores before top-k), and with it its IndexerKeys cache.
The indexer learns by distillation in the arena (`index_kl`: top-k has no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from attnzoo.errors import ModelLoadError
from attnzoo.layers.cache_spec import CacheKind
from attnzoo.layers.dsa import DSAttention
from attnzoo.layers.dsa_kpool import KPoolDSAttention
from attnzoo.mechanisms import delta_rule, ffn, hyper, latent
from attnzoo.mechanisms.common import Tensors, cost_shape, take
from attnzoo.mechanisms.registry import Contestant, Distill, Family
from attnzoo.ops.sparse import cost as cost_model
from attnzoo.ops.sparse.kl import indexer_kl_loss
from attnzoo.ops.sparse.select import lightning_indexer_scores

if TYPE_CHECKING:
    from attnzoo.arena.mechanisms import Shape
    from attnzoo.models.config import ModelConfig


@dataclass
class Config:
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    indexer_interleaved_rope: bool = False   # GLM-5 rotates interleaved pairs, DeepSeek-V3.2 half-split ones
    indexer_types: list[str] = field(default_factory=list)  # per layer full | shared (IndexShare); [] = all full
    index_kpool: int = 0                     # > 0: GLM-5.3-Flash's k-pool indexer over pools of this many keys
    index_kpool_always_select_tail: bool = True


def from_hf(raw: dict[str, Any], **defaults: Any) -> Config:
    """The indexer of a transformers config (defaults: DeepSeek-V3.2's sizes, replaced by `defaults`)."""
    d = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, **defaults}
    return Config(index_n_heads=raw.get("index_n_heads", d["index_n_heads"]),
                  index_head_dim=raw.get("index_head_dim", d["index_head_dim"]),
                  index_topk=raw.get("index_topk", d["index_topk"]),
                  indexer_interleaved_rope=d.get("indexer_interleaved_rope", False), indexer_types=indexer_types(raw),
                  index_kpool=d.get("index_kpool", 0),
                  index_kpool_always_select_tail=raw.get("index_kpool_always_select_tail", True))


def indexer_types(raw: dict[str, Any]) -> list[str]:
    """IndexShare schedule (GLM-5.2): explicit list, else a pattern like "FFSS...", else layer i is full
    iff max(i - offset + 1, 0) % freq == 0 (transformers' GlmMoeDsaConfig rule)."""
    n = raw["num_hidden_layers"]
    if raw.get("indexer_types"):
        return list(raw["indexer_types"])
    pattern = raw.get("index_topk_pattern")
    if pattern is not None:
        if isinstance(pattern, str):
            bad = set(pattern) - {"F", "S"}
            if bad:
                raise ModelLoadError(f"index_topk_pattern {pattern!r} has letters {sorted(bad)}; allowed: F, S")
            return ["full" if c == "F" else "shared" for c in pattern]
        return list(pattern)
    freq, offset = max(raw.get("index_topk_freq", 1), 1), raw.get("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]


def build(cfg: ModelConfig, idx: int) -> DSAttention:
    d = cfg.dsa
    kw = dict(index_n_heads=d.index_n_heads, index_head_dim=d.index_head_dim, index_topk=d.index_topk,
              shared_indexer=d.indexer_types[idx] == "shared", **latent.layer_kwargs(cfg))
    if d.index_kpool:  # NoPE: no rotary options
        return KPoolDSAttention(idx, cfg.hidden_size, cfg.num_heads, index_kpool=d.index_kpool,
                                select_tail=d.index_kpool_always_select_tail, **kw)
    return DSAttention(idx, cfg.hidden_size, cfg.num_heads, indexer_interleaved_rope=d.indexer_interleaved_rope,
                       rope_scaling=cfg.rope_scaling, interleaved_rope=cfg.mla.rope_interleave, **kw)


def hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int) -> dict[str, torch.Tensor]:
    """MLA's tensors, plus the indexer's on layers that have their own (IndexShare's shared ones do not)."""
    out = latent.hf_weights(cfg, tensors, src, dst, idx)
    if cfg.dsa.indexer_types[idx] == "full":
        names = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
        if cfg.dsa.index_kpool:
            names += ("index_kpool_compress_gate", "index_kpool_compress_ape")
        out.update({dst + n: take(tensors, src + "self_attn.indexer." + n) for n in names})
    return out


def cost(cfg: ModelConfig, idx: int, context: int) -> tuple[float, float]:
    """(FLOPs, KV bytes read) for the token at `context`: MLA over the top-k keys plus the indexer."""
    d = cfg.dsa
    shape = cost_shape(cfg, **latent.shape_kwargs(cfg), index_heads=d.index_n_heads, index_dim=d.index_head_dim,
                       index_topk=d.index_topk)
    c = cost_model.cost_per_token(cost_model.dsa_terms, context, shape)
    return c.flops(cost_model.LAYER), c.kv_bytes


def check(cfg: ModelConfig) -> None:
    """DSA runs on MLA; the IndexShare schedule (default: every layer full) names each layer, the first full."""
    if cfg.mla is None:
        raise ValueError("DSA runs on MLA: the mla parameters are needed")
    types = cfg.dsa.indexer_types = cfg.dsa.indexer_types or ["full"] * cfg.num_layers
    if len(types) != cfg.num_layers or set(types) - {"full", "shared"} or types[0] != "full":
        raise ValueError(f"indexer_types must name full or shared for each of {cfg.num_layers} layers, "
                         f"the first full; got {types}")


# ---- transformers configs --------------------------------------------------------------------------------
def deepseek_v32(raw: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 plus the indexer (rotating half-split pairs)."""
    return {**latent.deepseek_v3(raw), "dsa": from_hf(raw, indexer_interleaved_rope=False)}


def glm_moe_dsa(raw: dict[str, Any]) -> dict[str, Any]:
    """GLM-5: DeepSeek-V3's layout, an indexer rotating interleaved pairs, IndexShare schedules."""
    return {**latent.deepseek_v3(raw), "dsa": from_hf(raw, indexer_interleaved_rope=True)}


def glm5_next(raw: dict[str, Any]) -> dict[str, Any]:
    """GLM-5.3-Flash text, by transformers' Glm5NextTextConfig rules: KDA with the safe gate (lower bound
    -5) on layers i % 4 != 3 and NoPE MLA + k-pool DSA on the others (unless layer_types says otherwise;
    like transformers we do not read linear_attn_config's layer lists), DeepSeek MoE after the first 3 dense
    layers (unless mlp_layer_types), the clamped SwiGLU everywhere, hc_mult mHC residual streams."""
    n = raw["num_hidden_layers"]
    types = raw.get("layer_types") or ["linear_attention" if i % 4 != 3 else "indexed_attention" for i in range(n)]
    bad = set(types) - {"linear_attention", "indexed_attention", "full_attention"}
    if bad:
        raise ModelLoadError(f"layer types {sorted(bad)} are not supported; "
                             "supported: linear_attention, indexed_attention")
    if raw.get("qk_rope_head_dim", 0) or raw.get("q_lora_rank", 1536) is None:
        raise ModelLoadError("GLM-5.3-Flash's DSA layers are NoPE with a query latent: qk_rope_head_dim must be 0 "
                             "and q_lora_rank set")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {raw['hidden_act']!r} is not supported; supported: silu")
    kpool, topk = raw.get("index_kpool", 16), raw.get("index_topk", 2048)
    if kpool < 1 or topk % kpool:
        raise ModelLoadError(f"index_topk {topk} must be a positive multiple of index_kpool {kpool}")
    limit = raw.get("swiglu_limit", 10.0)
    return dict(
        architecture="glm5_next",
        layer_types=["linear_attention" if t == "linear_attention" else "full_attention" for t in types],
        delta_rule=delta_rule.from_hf(raw, "kda", num_heads=64, head_dim=128, safe_gate=True),
        attention_type="mla",
        mla=latent.from_hf(raw, q_lora_rank=1536, qk_nope_head_dim=256, qk_rope_head_dim=0, v_head_dim=256),
        dsa=from_hf(raw, index_n_heads=32, index_kpool=kpool),
        moe=ffn.glm5_next_moe(raw),
        mlp_layer_types=raw.get("mlp_layer_types") or ["dense" if i < 3 else "sparse" for i in range(n)],
        hyper=hyper.from_hf(raw),
        mlp_clamp=None if limit is None else (1.0, float(limit), 0.0),  # silu(min(gate, L)) * clamp(up, -L, L)
        use_rope=False, sliding_window=None, head_dim=0,  # NoPE: nothing to rotate
        # transformers' defaults where they differ from ours
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5), max_position_embeddings=raw.get("max_position_embeddings", 1048576))


# ---- the arena's distillation of the indexer ----------------------------------------------------------------
def index_kl(layer: DSAttention, x: torch.Tensor, rope, cu: list[int]) -> torch.Tensor:
    """KL from MLA's attention (summed over heads, the expanded q/k as the layer computes them) to the
    indexer's scores, over every causal key; gradients reach the indexer only."""
    n, H, dn, dr = x.shape[0], layer.num_heads, layer.dn, layer.dr
    with torch.no_grad():  # the teacher
        q_lat, q_nope, q_pe, c_kv, k_pe = layer.project(x, rope)
        w_uk = layer.kv_b_proj.weight.view(H, dn + layer.dv, layer.kv_lora_rank)[:, :dn]
        k_nope = torch.einsum("nc,hdc->nhd", c_kv, w_uk)
        q = torch.cat([q_nope, q_pe], -1)
        k = torch.cat([k_nope, k_pe[:, None].expand(n, H, dr)], -1)
    iq, ik, iw = layer.indexer(x, q_lat, rope)   # the student
    loss = x.new_zeros(())
    for a, b in zip(cu[:-1], cu[1:]):
        scores = lightning_indexer_scores(iq[None, a:b], ik[None, a:b], iw[None, a:b],
                                          scale=layer.index_head_dim ** -0.5)
        loss = loss + indexer_kl_loss(scores, q=q[None, a:b], k=k[None, a:b], scale=layer.scale)
    return loss / n


def arena_fields(s: Shape) -> dict[str, Any]:
    """MLA + DeepSeek-V3.2's lightning indexer choosing the top seq_len / 4 tokens per query."""
    d = Config(index_n_heads=max(1, s.heads // 2), index_head_dim=s.head_dim, index_topk=max(16, s.seq_len // 4),
               indexer_interleaved_rope=False)
    return dict(dsa=d, **latent.arena_fields(s))


FAMILY = Family(
    "dsa", title="DeepSeek sparse attention", config=Config, field="dsa", refines="mla",
    layer_types=("full_attention", "sliding_attention"), check=check, build=build, hf_weights=hf_weights, cost=cost,
    readers={"deepseek_v32": deepseek_v32, "glm_moe_dsa": glm_moe_dsa, "glm5_next": glm5_next,
             "glm5_next_text": glm5_next},
    sharding=latent.SHARDING, distill=Distill(lambda layer: not layer.shared_indexer, index_kl),
    cache_kinds=(CacheKind.LATENT, CacheKind.INDEX_KEYS),
    contestants=(Contestant("dsa", arena_fields, "DeepSeek sparse attention (MLA)"),))
