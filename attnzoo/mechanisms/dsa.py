"""DeepSeek Sparse Attention: MLA whose queries attend only the top-k keys a lightning indexer picks
(DeepSeek-V3.2, GLM-5 with IndexShare's shared layers); GLM-5.3-Flash's variant scores pools of k keys
(index_kpool) on NoPE MLA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnzoo.errors import ModelLoadError
from attnzoo.layers.dsa import DSAttention
from attnzoo.layers.dsa_kpool import KPoolDSAttention
from attnzoo.mechanisms import latent
from attnzoo.mechanisms.common import Tensors, cost_shape, take
from attnzoo.ops.sparse import cost as cost_model

if TYPE_CHECKING:
    import torch

    from attnzoo.models.config import ModelConfig

FIELD = "dsa"


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
    c = cost_model.cost_per_token("dsa", context, shape)
    return c.flops(cost_model.LAYER), c.kv_bytes
