"""MiniMax Sparse Attention (MiniMax-M3): GQA whose queries attend only the key blocks an index branch
picks (one index head per KV group), the local blocks always among them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attnzoo.layers.msa import MiniMaxSparseAttention
from attnzoo.mechanisms import softmax
from attnzoo.mechanisms.common import Tensors, cost_shape, take
from attnzoo.ops.sparse import cost as cost_model

if TYPE_CHECKING:
    from attnzoo.models.config import ModelConfig

FIELD = "msa"


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
    c = cost_model.cost_per_token("msa", context, shape)
    return c.flops(cost_model.LAYER), c.kv_bytes
