"""transformers checkpoints: config.json + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from attnzoo.errors import ModelLoadError
from attnzoo.mechanisms import delta, dsa, ffn, hyper, latent, msa
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.weights import build_model

HF_ARCHITECTURES = ("llama", "mistral", "qwen3", "cohere2", "mimo_v2_flash", "deepseek_v3", "deepseek_v32",
                    "glm_moe_dsa", "qwen3_next", "qwen3_5", "qwen3_5_text", "kimi_linear", "minimax_m3_vl",
                    "minimax_m3_vl_text", "glm5_next", "glm5_next_text")


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


def _delta_rule_config(raw: dict[str, Any], arch: str) -> dict[str, Any]:
    """Hybrid delta-rule models: layer pattern, delta-rule sizes, MoE and attention flavour."""
    n = raw["num_hidden_layers"]
    out: dict[str, Any] = {}
    if arch == "kimi_linear":
        lin = raw.get("linear_attn_config") or {}
        out["linear"] = delta.from_hf(raw, "kda")
        # the checkpoint's lists are 1-indexed; transformers' fallback pattern without them is not the checkpoint's
        full = set(lin.get("full_attn_layers") or [])
        out["layer_types"] = raw.get("layer_types") or [
            "full_attention" if i + 1 in full else "linear_attention" for i in range(n)]
        # Kimi's MLA has a full-rank query and always rotates interleaved pairs
        out["mla"] = replace(latent.from_hf(raw, q_lora_rank=None), rope_interleave=True)
        out["head_dim"] = out["mla"].qk_rope_head_dim
        out["use_rope"] = False  # NoPE MLA: position comes from the KDA layers' conv and decay
        out["moe"] = ffn.from_hf(raw, arch)
        if out["moe"] is not None:
            first = raw.get("first_k_dense_replace", 1)
            out["mlp_layer_types"] = raw.get("mlp_layer_types") or ["dense" if i < first else "sparse" for i in range(n)]
        return out
    out["linear"] = delta.from_hf(raw, "gdn")
    interval = raw.get("full_attention_interval", 4)
    out["layer_types"] = raw.get("layer_types") or [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    out["attn_output_gate"] = True
    moe = ffn.from_hf(raw, arch) if arch == "qwen3_next" else None
    if moe is not None:
        out["moe"] = moe
        skip, step = set(raw.get("mlp_only_layers") or []), raw.get("decoder_sparse_step", 1)
        out["mlp_layer_types"] = ["sparse" if i not in skip and (i + 1) % step == 0 else "dense" for i in range(n)]
    return out


def _mimo_config(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str], int, ffn.Config | None]:
    """MiMo-V2-Flash: global at layer 0 and every 6th, sliding elsewhere with twice the KV heads and sink
    logits; q/k head_dim != v_head_dim; values scaled; RoPE theta (and partial factor) per layer type;
    DeepSeek-style routing without shared experts. Returns (extra fields, layer types, window, moe)."""
    n = raw["num_hidden_layers"]
    layer_types = raw.get("layer_types") or [
        "full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    # the reference attends sliding_window_size previous tokens plus the query (transformers adds the 1)
    window = raw["sliding_window_size"] + 1 if raw.get("sliding_window_size") else raw.get("sliding_window")
    rp = raw.get("rope_parameters") or {}
    layer_rope = {}
    for t in ("full_attention", "sliding_attention"):
        r = rp.get(t, rp)
        layer_rope[t] = dict(theta=float(r.get("rope_theta", raw.get("rope_theta", 10000.0))),
                             partial=float(r.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))),
                             scaling=None if r.get("rope_type", "default") == "default" else dict(r))
    moe = ffn.from_hf(raw, "mimo_v2_flash")
    extra = dict(layer_rope=layer_rope, sliding_num_kv_heads=2 * raw["num_key_value_heads"],
                 v_head_dim=raw.get("v_head_dim"), sliding_sinks=True,
                 value_scale=float(raw.get("attention_value_scale") or 1.0),
                 mlp_layer_types=raw.get("mlp_layer_types") or ["dense"] + ["sparse" if moe is not None else "dense"] * (n - 1))
    return extra, layer_types, window, moe


def _minimax_config(raw: dict[str, Any]) -> dict[str, Any]:
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
    moe = ffn.from_hf(raw, "minimax_m3")
    return dict(
        layer_types=["sparse_attention" if t == "minimax_m3_sparse" else t for t in types],
        msa=msa.from_hf(raw),
        mlp_clamp=(float(raw.get("swiglu_alpha", 1.702)), float(raw.get("swiglu_limit", 7.0))),
        intermediate_size=raw.get("dense_intermediate_size", raw["intermediate_size"]),
        mlp_layer_types=raw.get("mlp_layer_types") or ["sparse" if moe is not None else "dense"] * n, moe=moe)


def _glm5_next_config(raw: dict[str, Any]) -> dict[str, Any]:
    """GLM-5.3-Flash text, by transformers' Glm5NextTextConfig rules: KDA with the safe gate (lower bound
    -5) on layers i % 4 != 3 and NoPE MLA + k-pool DSA on the others (unless layer_types says otherwise;
    like transformers we do not read linear_attn_config's layer lists), DeepSeek MoE after the first 3 dense
    layers (unless mlp_layer_types), the clamped SwiGLU everywhere, hc_mult mHC residual streams."""
    n = raw["num_hidden_layers"]
    types = raw.get("layer_types") or ["linear_attention" if i % 4 != 3 else "indexed_attention" for i in range(n)]
    bad = set(types) - {"linear_attention", "indexed_attention", "full_attention"}
    if bad:
        raise ModelLoadError(f"layer types {sorted(bad)} are not supported; "
                             "supported: linear_attention, indexed_attention")
    if raw.get("qk_rope_head_dim", 0) or raw.get("q_lora_rank", 1536) is None:
        raise ModelLoadError("GLM-5.3-Flash's DSA layers are NoPE with a query latent: qk_rope_head_dim must be 0 "
                             "and q_lora_rank set")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {raw['hidden_act']!r} is not supported; supported: silu")
    kpool, topk = raw.get("index_kpool", 16), raw.get("index_topk", 2048)
    if kpool < 1 or topk % kpool:
        raise ModelLoadError(f"index_topk {topk} must be a positive multiple of index_kpool {kpool}")
    limit = raw.get("swiglu_limit", 10.0)
    return dict(
        layer_types=["linear_attention" if t == "linear_attention" else "full_attention" for t in types],
        linear=delta.from_hf(raw, "kda", num_heads=64, head_dim=128, safe_gate=True),
        mla=latent.from_hf(raw, q_lora_rank=1536, qk_nope_head_dim=256, qk_rope_head_dim=0, v_head_dim=256),
        dsa=dsa.from_hf(raw, index_n_heads=32, index_kpool=kpool),
        moe=ffn.from_hf(raw, "glm5_next"),
        mlp_layer_types=raw.get("mlp_layer_types") or ["dense" if i < 3 else "sparse" for i in range(n)],
        hyper=hyper.from_hf(raw),
        mlp_clamp=None if limit is None else (1.0, float(limit), 0.0),  # silu(min(gate, L)) * clamp(up, -L, L)
        use_rope=False)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    arch = raw.get("model_type")
    if arch in ("qwen3_5", "minimax_m3_vl", "glm5_next") and "text_config" in raw:  # multimodal: its text model
        raw = {**raw["text_config"], "model_type": arch}
    if arch in ("glm5_next", "glm5_next_text"):  # transformers' defaults where they differ from ours
        raw = {"rms_norm_eps": 1e-5, "max_position_embeddings": 1048576, **raw}
    if arch not in HF_ARCHITECTURES:
        raise ModelLoadError(f"model_type {arch!r} is not supported; supported: {', '.join(HF_ARCHITECTURES)}")
    arch = {"qwen3_5_text": "qwen3_5", "minimax_m3_vl": "minimax_m3", "minimax_m3_vl_text": "minimax_m3",
            "glm5_next_text": "glm5_next"}.get(arch, arch)
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
    if arch in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa"):
        mla, moe = latent.from_hf(raw), ffn.from_hf(raw, arch)
        head_dim = mla.qk_rope_head_dim  # RoPE rotates only the decoupled rope slice
        window, layer_types = None, None
        if raw.get("mlp_layer_types"):
            moe.first_k_dense_replace = raw["mlp_layer_types"].count("dense")
            if raw["mlp_layer_types"] != sorted(raw["mlp_layer_types"]):  # dense first, then sparse
                raise ModelLoadError(f"mlp_layer_types {raw['mlp_layer_types']} interleave dense and sparse layers")
    extra: dict[str, Any] = {}
    if arch in ("deepseek_v32", "glm_moe_dsa"):
        # DeepSeek-V3.2's indexer rotates half-split pairs, GLM-5's interleaved ones
        extra["dsa"] = dsa.from_hf(raw, indexer_interleaved_rope=arch == "glm_moe_dsa")
    if arch == "cohere2":
        # 3 sliding (interleaved RoPE) : 1 global (NoPE); parallel block; LayerNorm; scaled logits
        every = raw.get("sliding_window_pattern", 4)
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % every else "full_attention" for i in range(raw["num_hidden_layers"])]
        window = raw.get("sliding_window")
        extra = dict(layer_rope={"full_attention": None}, rope_interleaved=True, norm="layer", parallel_block=True,
                     logit_scale=float(raw.get("logit_scale", 0.0625)), rms_norm_eps=raw.get("layer_norm_eps", 1e-5),
                     tie_word_embeddings=raw.get("tie_word_embeddings", True))
    if arch == "mimo_v2_flash":
        extra, layer_types, window, moe = _mimo_config(raw)
    if arch == "minimax_m3":
        extra = _minimax_config(raw)
        layer_types, moe = extra.pop("layer_types"), extra.pop("moe")
    if arch == "glm5_next":
        extra = _glm5_next_config(raw)
        layer_types, window, head_dim = extra.pop("layer_types"), None, 0  # NoPE: nothing to rotate
        mla, moe = extra.pop("mla"), extra.pop("moe")
    if arch in ("qwen3_next", "qwen3_5", "kimi_linear"):
        extra = _delta_rule_config(raw, arch)
        layer_types, window = extra.pop("layer_types"), None
        mla, moe = extra.pop("mla", None), extra.pop("moe", None)
        head_dim = extra.pop("head_dim", head_dim)
    return ModelConfig(
        architecture=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=extra.pop("intermediate_size", raw["intermediate_size"]), num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=extra.pop("rms_norm_eps", raw.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        partial_rotary_factor=partial,
        max_position_embeddings=raw.get("max_position_embeddings", raw.get("model_max_length", 2048)),
        tie_word_embeddings=extra.pop("tie_word_embeddings", raw.get("tie_word_embeddings", False)),
        attention_bias=raw.get("attention_bias", False), mlp_bias=raw.get("mlp_bias", False),
        qk_norm=arch in ("qwen3", "qwen3_next", "qwen3_5", "minimax_m3"), sliding_window=window, layer_types=list(layer_types or []),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        name=raw.get("_name_or_path", ""), attention_type="mla" if mla else "softmax", mla=mla, moe=moe, **extra)


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
    model = build_model(cfg, tensors, dtype)
    from attnzoo.models.tokenizer import Tokenizer
    model.tokenizer = Tokenizer.from_hf_dir(path, cfg)
    return model
