"""Native Sparse Attention: compressed, selected and sliding-window branches mixed by gates. Trains in one
pass and decodes from its cache (raw K/V rows + compressed rows); no transformers checkpoint carries it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from attnzoo.errors import ModelLoadError
from attnzoo.layers.nsa import NativeSparseAttention
from attnzoo.mechanisms.common import Tensors, cost_shape
from attnzoo.ops.sparse import cost as cost_model

if TYPE_CHECKING:
    import torch

    from attnzoo.models.config import ModelConfig

FIELD = "nsa"


@dataclass
class Config:
    """NativeSparseAttention's options, with its defaults."""
    block_len: int = 32
    stride: int = 16
    select_block: int = 64
    num_selected: int = 16
    window: int | None = 512
    shared_kv: bool = False
    compress: str = "mlp"
    compress_hidden: int | None = None
    gate_hidden: int | None = None


def from_hf(raw: dict[str, Any]) -> Config:
    raise ModelLoadError("no transformers architecture carries native sparse attention")


def build(cfg: ModelConfig, idx: int) -> NativeSparseAttention:
    return NativeSparseAttention(idx, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                 qk_norm=cfg.qk_norm, norm_eps=cfg.rms_norm_eps, use_rope=cfg.use_rope,
                                 **asdict(cfg.nsa))


def hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int) -> dict[str, torch.Tensor]:
    raise ModelLoadError("no transformers architecture carries native sparse attention")


def cost(cfg: ModelConfig, idx: int, context: int) -> tuple[float, float]:
    n = cfg.nsa
    shape = cost_shape(cfg, nsa_l=n.block_len, nsa_d=n.stride, nsa_l_sel=n.select_block, nsa_n=n.num_selected,
                       nsa_w=n.window or 0)
    c = cost_model.cost_per_token("nsa", context, shape)
    return c.flops(cost_model.LAYER), c.kv_bytes
