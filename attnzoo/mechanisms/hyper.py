"""mHC residual streams (GLM-5.3-Flash): hc_mult streams mixed around each attention and MLP block by
HyperConnection. Not a layer type: the block around the layers (models/glm5_next.py); registered for its
config (`hyper`). Tensor parallelism refuses it (no split of the streams)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attnzoo.layers.hyper import HyperConnection
from attnzoo.mechanisms.common import Tensors, take
from attnzoo.mechanisms.registry import Family

if TYPE_CHECKING:
    from attnzoo.models.config import ModelConfig


@dataclass
class Config:
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6


def from_hf(raw: dict[str, Any]) -> Config:
    return Config(hc_mult=raw.get("hc_mult", 4), hc_sinkhorn_iters=raw.get("hc_sinkhorn_iters", 20),
                  hc_eps=raw.get("hc_eps", 1e-6))


def build(cfg: ModelConfig, idx: int) -> HyperConnection:
    h = cfg.hyper
    return HyperConnection(cfg.hidden_size, h.hc_mult, h.hc_sinkhorn_iters, h.hc_eps, cfg.rms_norm_eps)


def hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int) -> dict[str, torch.Tensor]:
    """Both blocks' connections: checkpoints say hc_attn_fn, transformers' modules attn_hc.fn."""
    out = {}
    for blk in ("attn", "ffn"):
        for p in ("fn", "base", "scale"):
            name = f"{src}hc_{blk}_{p}" if f"{src}hc_{blk}_{p}" in tensors else f"{src}{blk}_hc.{p}"
            out[f"{dst}{blk}_hc.{p}"] = take(tensors, name)
    return out


FAMILY = Family("hyper", title="mHC residual streams", config=Config, field="hyper")
