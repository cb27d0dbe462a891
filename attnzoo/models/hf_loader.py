"""transformers checkpoints: config.json + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.errors import ModelLoadError
from attnzoo.models.weights import build_model

HF_ARCHITECTURES = ("llama", "mistral", "qwen3", "deepseek_v3")


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling or None, partial_rotary_factor) from either transformers 5's `rope_parameters`
    or the older `rope_theta` + `rope_scaling` keys."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    merged = {**legacy, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    partial = float(merged.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    return theta, (None if kind == "default" else {**merged, "rope_type": kind}), partial


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    arch = raw.get("model_type")
    if arch not in HF_ARCHITECTURES:
        raise ModelLoadError(f"model_type {arch!r} is not supported; supported: {', '.join(HF_ARCHITECTURES)}")
    heads = raw["num_attention_heads"]
    theta, scaling, partial = _rope(raw)
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if arch == "qwen3" and not raw.get("use_sliding_window", False):
        window, layer_types = None, None
    elif arch == "qwen3" and window and not layer_types:
        # as transformers' Qwen3Config: only layers >= max_window_layers slide
        first = raw.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(raw["num_hidden_layers"])]
    if layer_types and "sliding_attention" not in layer_types:
        window = None
    eos = raw.get("eos_token_id")
    mla = moe = None
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    if arch == "deepseek_v3":
        mla = {k: raw.get(k, d) for k, d in (("q_lora_rank", 1536), ("kv_lora_rank", 512), ("qk_nope_head_dim", 128),
                                             ("qk_rope_head_dim", 64), ("v_head_dim", 128), ("rope_interleave", True))}
        moe = {k: raw.get(k, d) for k, d in (("n_routed_experts", 256), ("num_experts_per_tok", 8),
                                             ("moe_intermediate_size", 2048), ("n_group", 8), ("topk_group", 4),
                                             ("norm_topk_prob", True), ("routed_scaling_factor", 2.5),
                                             ("n_shared_experts", 1), ("first_k_dense_replace", 3))}
        head_dim = mla["qk_rope_head_dim"]  # RoPE rotates only the decoupled rope slice
        window, layer_types = None, None
    return ModelConfig(
        architecture=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        partial_rotary_factor=partial, max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", False), mlp_bias=raw.get("mlp_bias", False),
        qk_norm=arch == "qwen3", sliding_window=window, layer_types=list(layer_types or []),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        name=raw.get("_name_or_path", ""), attention_type="mla" if mla else "softmax", mla=mla, moe=moe)


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> DecoderLM:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}/config.json could not be read as JSON: {e}") from None
    cfg = config_from_hf(raw)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(path / f), framework="pt") as st:
                for name in tqdm(st.keys(), desc=f"loading {f}", unit="tensor", leave=False):
                    tensors[name] = st.get_tensor(name)
        except Exception as e:  # safetensors raises several error types for missing/corrupt files
            raise ModelLoadError(f"{path / f} could not be read as safetensors: {e}") from None
    model = build_model(cfg, tensors, dtype)
    from attnzoo.models.tokenizer import Tokenizer
    model.tokenizer = Tokenizer.from_hf_dir(path, cfg)
    return model
