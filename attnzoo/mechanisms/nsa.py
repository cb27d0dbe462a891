"""Native Sparse Attention: compressed, selected and sliding-window branches mixed by gates. Trains in one
pass and decodes from its cache (raw K/V rows + compressed rows); no transformers checkpoint carries it
(it reads no architecture). Layer type "nsa". Tensor parallelism refuses it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from attnzoo.errors import ModelLoadError
from attnzoo.layers.cache_spec import CacheKind
from attnzoo.layers.nsa import NativeSparseAttention
from attnzoo.mechanisms.common import Tensors, cost_shape
from attnzoo.mechanisms.registry import Contestant, Family
from attnzoo.ops.sparse import cost as cost_model

if TYPE_CHECKING:
    import torch

    from attnzoo.arena.mechanisms import Shape
    from attnzoo.models.config import ModelConfig


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
    c = cost_model.cost_per_token(cost_model.nsa_terms, context, shape)
    return c.flops(cost_model.LAYER), c.kv_bytes


def arena_fields(s: Shape) -> dict[str, Any]:
    """Paper mode (separate K/V per branch, MLP compressor): compression blocks of seq_len / 16 tokens with
    half that stride, selection of 4 blocks of seq_len / 16 (block 0 and the two local blocks among them),
    a window branch of seq_len / 4."""
    b = s.block
    opts = Config(block_len=b, stride=b // 2, select_block=b, num_selected=4, window=s.window,
                  compress_hidden=s.head_dim, gate_hidden=max(16, s.hidden // 4))
    return dict(num_kv_heads=s.kv_heads, nsa=opts, layer_types=["nsa"] * s.layers)


FAMILY = Family(
    "nsa", title="native sparse attention", config=Config, field="nsa", layer_types=("nsa",), build=build,
    hf_weights=hf_weights, cost=cost, cache_kinds=(CacheKind.ROWS, CacheKind.COMPRESSED),
    contestants=(Contestant("nsa", arena_fields, "native sparse attention"),))
