"""MiniMax Sparse Attention (MiniMax-M3): GQA whose queries attend only the key blocks an index branch
picks (one index head per KV group), the local blocks always among them. Layer type "sparse_attention".

Architectures read here: minimax_m3_vl (the text model). Tensor parallelism refuses it. The index branch
learns by distillation in the arena (`index_kl`: top-k has no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attnzoo.errors import ModelLoadError
from attnzoo.layers.cache_spec import CacheKind
from attnzoo.layers.msa import MiniMaxSparseAttention
from attnzoo.mechanisms import ffn, softmax
from attnzoo.mechanisms.common import Tensors, cost_shape, take
from attnzoo.mechanisms.registry import Contestant, Distill, Family
from attnzoo.ops.rope import apply_rope
from attnzoo.ops.sparse import cost as cost_model
from attnzoo.ops.sparse.kl import msa_indexer_kl_loss

if TYPE_CHECKING:
    from attnzoo.arena.mechanisms import Shape
    from attnzoo.models.config import ModelConfig


@dataclass
class Config:
    index_head_dim: int
    block_size: int
    topk_blocks: int
    local_blocks: int = 1


def from_hf(raw: dict[str, Any]) -> Config:
    return Config(index_head_dim=raw.get("index_head_dim", 128), block_size=raw.get("index_block_size", 128),
                  topk_blocks=raw.get("index_topk_blocks", 16), local_blocks=raw.get("index_local_blocks", 1))


def build(cfg: ModelConfig, idx: int) -> MiniMaxSparseAttention:
    m = cfg.msa
    return MiniMaxSparseAttention(idx, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                  index_head_dim=m.index_head_dim, block_size=m.block_size,
                                  topk_blocks=m.topk_blocks, local_blocks=m.local_blocks, norm_eps=cfg.rms_norm_eps,
                                  qk_norm=cfg.qk_norm, bias=cfg.attention_bias, o_bias=cfg.attention_bias)


def hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int) -> dict[str, torch.Tensor]:
    """Softmax attention's tensors, plus the index branch with its q and k projections fused."""
    out, a = softmax.hf_weights(cfg, tensors, src, dst, idx), src + "self_attn.indexer."
    out[dst + "index_proj.weight"] = torch.cat([take(tensors, a + "q_proj.weight"), take(tensors, a + "k_proj.weight")])
    out[dst + "index_q_norm.weight"] = take(tensors, a + "q_norm.weight")
    out[dst + "index_k_norm.weight"] = take(tensors, a + "k_norm.weight")
    return out


def cost(cfg: ModelConfig, idx: int, context: int) -> tuple[float, float]:
    m = cfg.msa
    shape = cost_shape(cfg, index_heads=cfg.num_kv_heads, index_dim=m.index_head_dim, index_block=m.block_size,
                       index_topk_blocks=m.topk_blocks)
    c = cost_model.cost_per_token(cost_model.msa_terms, context, shape)
    return c.flops(cost_model.LAYER), c.kv_bytes


def minimax_m3(raw: dict[str, Any]) -> dict[str, Any]:
    """MiniMax-M3 text: MSA on the "minimax_m3_sparse" layers, clamped-GLU MLPs, sigmoid-routed MoE. Its
    `intermediate_size` is the experts' width; dense layers use `dense_intermediate_size`. transformers
    ignores `rotary_dim` (rotation width comes from partial_rotary_factor); so do we."""
    n = raw["num_hidden_layers"]
    types = raw.get("layer_types") or ["full_attention"] * n
    bad = set(types) - {"full_attention", "minimax_m3_sparse"}
    if bad:
        raise ModelLoadError(f"layer types {sorted(bad)} are not supported; supported: full_attention, minimax_m3_sparse")
    if raw.get("index_n_heads", raw.get("num_key_value_heads")) != raw.get("num_key_value_heads"):
        raise ModelLoadError("MSA needs one index head per KV head (index_n_heads == num_key_value_heads)")
    moe = ffn.minimax_moe(raw)
    return dict(
        architecture="minimax_m3", qk_norm=True, msa=from_hf(raw),
        layer_types=["sparse_attention" if t == "minimax_m3_sparse" else t for t in types],
        mlp_clamp=(float(raw.get("swiglu_alpha", 1.702)), float(raw.get("swiglu_limit", 7.0))),
        intermediate_size=raw.get("dense_intermediate_size", raw["intermediate_size"]),
        mlp_layer_types=raw.get("mlp_layer_types") or ["sparse" if moe is not None else "dense"] * n, moe=moe)


def index_kl(layer: MiniMaxSparseAttention, x: torch.Tensor, rope, cu: list[int]) -> torch.Tensor:
    """KL from the main attention (averaged over each GQA group) to the index branch's block scores, every
    causal block allowed; gradients reach the index branch only."""
    n, G, dI, bs = x.shape[0], layer.num_kv_heads, layer.index_head_dim, layer.block_size
    with torch.no_grad():
        q, k, _, _ = layer.project(x, rope)
    iq, ik = layer.index_proj(x).split([G * dI, dI], -1)
    iq, ik = layer.index_q_norm(iq.view(n, G, dI)), layer.index_k_norm(ik)
    if rope is not None:
        iq = apply_rope(iq, *rope)
        ik = apply_rope(ik[:, None], *rope)[:, 0]
    loss = x.new_zeros(())
    for a, b in zip(cu[:-1], cu[1:]):
        T = b - a
        nb = -(-T // bs)
        every = torch.arange(nb, device=x.device).expand(1, T, G, nb)  # dense: every block allowed
        loss = loss + msa_indexer_kl_loss(q[None, a:b], k[None, a:b], iq[None, a:b], ik[None, a:b], every, bs,
                                          scale=layer.head_dim ** -0.5, loss_coeff=float(T))
    return loss / n   # loss_coeff T undoes the per-sequence 1 / (G * T): the sum over sequences / n tokens


def arena_fields(s: Shape) -> dict[str, Any]:
    """MSA on GQA: an index head per KV group picks 4 blocks of seq_len / 16 keys (the query's own block
    forced in)."""
    m = Config(index_head_dim=s.head_dim, block_size=s.block, topk_blocks=4, local_blocks=1)
    return dict(num_kv_heads=s.kv_heads, msa=m, layer_types=["sparse_attention"] * s.layers)


FAMILY = Family(
    "msa", title="MiniMax sparse attention", config=Config, field="msa", layer_types=("sparse_attention",),
    build=build, hf_weights=hf_weights, cost=cost,
    readers={"minimax_m3_vl": minimax_m3, "minimax_m3_vl_text": minimax_m3},
    distill=Distill(lambda layer: True, index_kl), cache_kinds=(CacheKind.KV, CacheKind.INDEX_KEYS),
    contestants=(Contestant("msa", arena_fields, "MiniMax sparse attention (GQA)"),))
