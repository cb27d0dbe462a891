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
        if cfg.mla is not None:
            out.update(_mla_attention(cfg, tensors, a, dst + "attn."))
        else:
            out.update(_softmax_attention(cfg, tensors, a, dst + "attn."))
        m = src + "mlp."
        if cfg.moe is not None and i >= cfg.moe["first_k_dense_replace"]:
            out.update(_moe(cfg, tensors, m, dst + "mlp."))
        else:
            out.update(_swiglu(tensors, m, dst + "mlp.", cfg.mlp_bias))
    return out


def _mla_attention(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], a: str, d: str) -> dict[str, torch.Tensor]:
    """MLA keeps transformers' module names: a one-to-one copy."""
    names = ["q_proj.weight"] if cfg.mla["q_lora_rank"] is None else [
        "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"]
    names += ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    if cfg.attention_bias:
        names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] + ([] if cfg.mla["q_lora_rank"] is None else ["q_a_proj.bias"])
    return {d + n: _take(tensors, a + n) for n in names}


def _moe(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], m: str, d: str) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down (DeepSeek's checkpoints and transformers' save_pretrained) or already fused
    3-D experts.gate_up_proj / experts.down_proj -> stacked [E, 2I, D] / [E, D, I]."""
    out = {d + "gate_weight": _take(tensors, m + "gate.weight"),
           d + "e_score_correction_bias": _take(tensors, m + "gate.e_score_correction_bias")}
    if m + "experts.gate_up_proj" in tensors:
        out[d + "experts_gate_up"] = tensors[m + "experts.gate_up_proj"]
        out[d + "experts_down"] = _take(tensors, m + "experts.down_proj")
    else:
        experts = range(cfg.moe["n_routed_experts"])
        out[d + "experts_gate_up"] = torch.stack([
            torch.cat([_take(tensors, f"{m}experts.{e}.gate_proj.weight"), _take(tensors, f"{m}experts.{e}.up_proj.weight")])
            for e in experts])
        out[d + "experts_down"] = torch.stack([_take(tensors, f"{m}experts.{e}.down_proj.weight") for e in experts])
    if cfg.moe["n_shared_experts"]:
        out.update(_swiglu(tensors, m + "shared_experts.", d + "shared_experts.", False))
    return out


def _swiglu(tensors: Mapping[str, torch.Tensor], m: str, d: str, bias: bool) -> dict[str, torch.Tensor]:
    out = {d + "gate_up_proj.weight": torch.cat([_take(tensors, m + "gate_proj.weight"), _take(tensors, m + "up_proj.weight")]),
           d + "down_proj.weight": _take(tensors, m + "down_proj.weight")}
    if bias:
        out[d + "gate_up_proj.bias"] = torch.cat([_take(tensors, m + "gate_proj.bias"), _take(tensors, m + "up_proj.bias")])
        out[d + "down_proj.bias"] = _take(tensors, m + "down_proj.bias")
    return out


def _softmax_attention(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], a: str, d: str
                       ) -> dict[str, torch.Tensor]:
    """q/k/v fused into one qkv_proj (one weight read per step)."""
    out = {d + "qkv_proj.weight": torch.cat([_take(tensors, a + p + "_proj.weight") for p in "qkv"]),
           d + "o_proj.weight": _take(tensors, a + "o_proj.weight")}
    if cfg.attention_bias:
        out[d + "qkv_proj.bias"] = torch.cat([_take(tensors, a + p + "_proj.bias") for p in "qkv"])
        out[d + "o_proj.bias"] = _take(tensors, a + "o_proj.bias")
    if cfg.qk_norm:
        out[d + "q_norm.weight"] = _take(tensors, a + "q_norm.weight")
        out[d + "k_norm.weight"] = _take(tensors, a + "k_norm.weight")
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
