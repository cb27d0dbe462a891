"""Map transformers-named tensors onto our modules (fusing q/k/v and gate/up) and build the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.errors import ModelLoadError


def _take(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ModelLoadError(f"the checkpoint has no tensor {name!r}, which this architecture needs")
    return tensors[name]


def convert_hf_state_dict(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names (model.layers.N.self_attn.q_proj.weight ...) -> DecoderLM state dict."""
    out = {"embed_tokens.weight": _take(tensors, "model.embed_tokens.weight"),
           "norm.weight": _take(tensors, "model.norm.weight")}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    else:
        out["lm_head.weight"] = _take(tensors, "lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[dst + norm + ".weight"] = _take(tensors, src + norm + ".weight")
        a = src + "self_attn."
        out[dst + "attn.qkv_proj.weight"] = torch.cat([_take(tensors, a + p + "_proj.weight") for p in "qkv"])
        out[dst + "attn.o_proj.weight"] = _take(tensors, a + "o_proj.weight")
        if cfg.attention_bias:
            out[dst + "attn.qkv_proj.bias"] = torch.cat([_take(tensors, a + p + "_proj.bias") for p in "qkv"])
            out[dst + "attn.o_proj.bias"] = _take(tensors, a + "o_proj.bias")
        if cfg.qk_norm:
            out[dst + "attn.q_norm.weight"] = _take(tensors, a + "q_norm.weight")
            out[dst + "attn.k_norm.weight"] = _take(tensors, a + "k_norm.weight")
        m = src + "mlp."
        out[dst + "mlp.gate_up_proj.weight"] = torch.cat([_take(tensors, m + "gate_proj.weight"),
                                                          _take(tensors, m + "up_proj.weight")])
        out[dst + "mlp.down_proj.weight"] = _take(tensors, m + "down_proj.weight")
        if cfg.mlp_bias:
            out[dst + "mlp.gate_up_proj.bias"] = torch.cat([_take(tensors, m + "gate_proj.bias"),
                                                            _take(tensors, m + "up_proj.bias")])
            out[dst + "mlp.down_proj.bias"] = _take(tensors, m + "down_proj.bias")
    return out


def build_model(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> DecoderLM:
    """Instantiate without allocating random weights (meta device), then adopt the loaded tensors."""
    state = convert_hf_state_dict(cfg, tensors)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    model.rotary = model.make_rotary()  # rope tables are computed, not loaded: build them for real
    expected = {k for k in model.state_dict()}
    for name, t in state.items():
        want = model.get_parameter(name).shape
        if tuple(t.shape) != tuple(want):
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(t.shape)}, the config implies {tuple(want)}")
    missing = expected - set(state)
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {sorted(missing)[:3]} (and {max(0, len(missing) - 3)} more)")
    model.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True broke the tie; restore it
    return model.eval()
