"""transformers checkpoints: config.json + safetensors (single file or sharded with an index). The config's
common fields are read here; each architecture's own by its family's reader (attnzoo/mechanisms/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from attnzoo.errors import ModelLoadError
from attnzoo.mechanisms import hf_readers
from attnzoo.mechanisms.common import hf_rope
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.mtp import mtp_layers
from attnzoo.models.weights import build_model


def base_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every transformers decoder config spells alike; an architecture's reader
    (its family's, attnzoo/mechanisms/) adds or replaces the rest."""
    heads = raw["num_attention_heads"]
    theta, scaling, partial = hf_rope(raw)
    window, layer_types = raw.get("sliding_window"), raw.get("layer_types")
    if layer_types and "sliding_attention" not in layer_types:
        window = None
    eos = raw.get("eos_token_id")
    return dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"], num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial,
        max_position_embeddings=raw.get("max_position_embeddings", raw.get("model_max_length", 2048)),
        tie_word_embeddings=raw.get("tie_word_embeddings", False), attention_bias=raw.get("attention_bias", False),
        mlp_bias=raw.get("mlp_bias", False), sliding_window=window, layer_types=list(layer_types or []),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        name=raw.get("_name_or_path", ""))


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """A transformers config.json -> ModelConfig, by the reader the registered families hold for its
    model_type (the architecture defaults to the model_type; a reader may name another)."""
    arch = raw.get("model_type")
    if "text_config" in raw:  # multimodal (Qwen3.5, MiniMax-M3, GLM-5.3-Flash): its text model
        raw = {**raw["text_config"], "model_type": arch}
    readers = hf_readers()
    if arch not in readers:
        raise ModelLoadError(f"model_type {arch!r} is not supported; supported: {', '.join(readers)}")
    return ModelConfig.compose(**{**base_fields(raw), "architecture": arch, **readers[arch](raw)})


def checkpoint_files(path: Path) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded: as its index lists them)."""
    index = path / "model.safetensors.index.json"
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> DecoderLM:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}/config.json could not be read as JSON: {e}") from None
    if isinstance(raw, dict) and raw.get("model_type") == "attnzoo":  # our own format (arena-trained models)
        from attnzoo.models.native import load_native
        return load_native(path, dtype, raw)
    cfg = config_from_hf(raw)
    files = checkpoint_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(path / f), framework="pt") as st:
                for name in tqdm(st.keys(), desc=f"loading {f}", unit="tensor", leave=False):
                    tensors[name] = st.get_tensor(name)
        except Exception as e:  # safetensors raises several error types for missing/corrupt files
            raise ModelLoadError(f"{path / f} could not be read as safetensors: {e}") from None
    if "model.language_model.embed_tokens.weight" in tensors:  # multimodal (Qwen3.5, GLM-5.3-Flash): the text model
        tensors = {k.replace("model.language_model.", "model.", 1): t for k, t in tensors.items()
                   if k.startswith(("model.language_model.", "lm_head."))}
    cfg.num_mtp_layers = mtp_layers(raw, cfg, tensors)
    model = build_model(cfg, tensors, dtype)
    from attnzoo.models.tokenizer import Tokenizer
    model.tokenizer = Tokenizer.from_hf_dir(path, cfg)
    return model
