"""Map transformers-named tensors onto our modules (fusing q/k/v and gate/up) and build the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.overrides import TorchFunctionMode

from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.errors import ModelLoadError
from attnzoo.models.glm5_next import Glm5NextLM


def _take(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ModelLoadError(f"the checkpoint has no tensor {name!r}, which this architecture needs")
    return tensors[name]


ZERO_CENTRED_NORMS = ("qwen3_next", "qwen3_5", "minimax_m3")  # RMSNorm weights stored as w, applied as (1 + w)


def convert_hf_state_dict(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names (model.layers.N.self_attn.q_proj.weight ...) -> DecoderLM state dict."""
    out = _convert(cfg, tensors)
    if cfg.architecture in ZERO_CENTRED_NORMS:  # fold the 1 in once, so one RMSNorm serves every model
        for name in out:
            if name.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight")) or name == "norm.weight":
                # (DSA's indexer k_norm is a LayerNorm, but DSA models are not in this list)
                out[name] = out[name].float() + 1.0
    return out


def _convert(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"embed_tokens.weight": _take(tensors, "model.embed_tokens.weight"),
           "norm.weight": _take(tensors, "model.norm.weight")}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    else:
        out["lm_head.weight"] = _take(tensors, "lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm",) if cfg.parallel_block else ("input_layernorm", "post_attention_layernorm"):
            out[dst + norm + ".weight"] = _take(tensors, src + norm + ".weight")
        a = src + "self_attn."
        if cfg.layer_types[i] == "linear_attention" and cfg.linear["kind"] == "kda":
            out.update(_kda(tensors, a, dst + "attn."))
        elif cfg.layer_types[i] == "linear_attention":
            out.update(_gdn(cfg, tensors, src + "linear_attn.", dst + "attn."))
        elif cfg.layer_types[i] == "sparse_attention":
            out.update(_softmax_attention(cfg, tensors, a, dst + "attn."))
            out[dst + "attn.index_proj.weight"] = torch.cat([_take(tensors, a + "indexer.q_proj.weight"),
                                                             _take(tensors, a + "indexer.k_proj.weight")])
            out[dst + "attn.index_q_norm.weight"] = _take(tensors, a + "indexer.q_norm.weight")
            out[dst + "attn.index_k_norm.weight"] = _take(tensors, a + "indexer.k_norm.weight")
        elif cfg.mla is not None:
            out.update(_mla_attention(cfg, tensors, a, dst + "attn."))
            if cfg.dsa is not None and cfg.dsa["indexer_types"][i] == "full":
                names = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
                if cfg.dsa.get("index_kpool"):  # GLM-5.3-Flash's k-pool indexer
                    names += ("index_kpool_compress_gate", "index_kpool_compress_ape")
                out.update({dst + "attn." + n: _take(tensors, a + "indexer." + n) for n in names})
        else:
            out.update(_softmax_attention(cfg, tensors, a, dst + "attn."))
        m = src + ("block_sparse_moe." if src + "block_sparse_moe.gate_proj.weight" in tensors
                   or src + "block_sparse_moe.gate.weight" in tensors else "mlp.")  # Kimi Linear's name
        if cfg.mlp_layer_types[i] == "sparse" and cfg.moe.get("kind") == "qwen":
            out.update(_qwen_moe(cfg, tensors, m, dst + "mlp."))
        elif cfg.mlp_layer_types[i] == "sparse":
            out.update(_moe(cfg, tensors, m, dst + "mlp."))
        else:
            out.update(_swiglu(tensors, m, dst + "mlp.", cfg.mlp_bias))
        if cfg.hyper is not None:  # mHC: checkpoints say hc_attn_fn, transformers' modules attn_hc.fn
            for blk in ("attn", "ffn"):
                for p in ("fn", "base", "scale"):
                    name = f"{src}hc_{blk}_{p}" if f"{src}hc_{blk}_{p}" in tensors else f"{src}{blk}_hc.{p}"
                    out[f"{dst}{blk}_hc.{p}"] = _take(tensors, name)
    return out


def _mla_attention(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], a: str, d: str) -> dict[str, torch.Tensor]:
    """MLA keeps transformers' module names: a one-to-one copy."""
    names = ["q_proj.weight"] if cfg.mla["q_lora_rank"] is None else [
        "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"]
    names += ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    if cfg.attention_bias:
        names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] + ([] if cfg.mla["q_lora_rank"] is None else ["q_a_proj.bias"])
    return {d + n: _take(tensors, a + n) for n in names}


def _gdn(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], a: str, d: str) -> dict[str, torch.Tensor]:
    """Gated DeltaNet -> one in_proj [q | k | v | z | b | a]. Qwen3.5 stores the four projections apart;
    Qwen3-Next packs them per key head ([q | k | v | z] and [b | a] for each of the Hk groups)."""
    lin = cfg.linear
    Hk, Hv, dk, dv = lin["num_k_heads"], lin["num_v_heads"], lin["k_dim"], lin["v_dim"]
    r = Hv // Hk
    if a + "in_proj_qkvz.weight" in tensors:
        qkvz = tensors[a + "in_proj_qkvz.weight"]
        q, k, v, z = qkvz.view(Hk, 2 * dk + 2 * r * dv, -1).split([dk, dk, r * dv, r * dv], 1)
        b, a_ = _take(tensors, a + "in_proj_ba.weight").view(Hk, 2 * r, -1).split([r, r], 1)
        parts = [t.reshape(-1, qkvz.shape[-1]) for t in (q, k, v, z, b, a_)]
    else:
        parts = [_take(tensors, a + f"in_proj_{p}.weight") for p in ("qkv", "z", "b", "a")]
    return {d + "in_proj.weight": torch.cat(parts), d + "conv_weight": _take(tensors, a + "conv1d.weight")[:, 0],
            d + "A_log": _take(tensors, a + "A_log"), d + "dt_bias": _take(tensors, a + "dt_bias"),
            d + "norm_weight": _take(tensors, a + "norm.weight"), d + "out_proj.weight": _take(tensors, a + "out_proj.weight")}


def _kda(tensors: Mapping[str, torch.Tensor], a: str, d: str) -> dict[str, torch.Tensor]:
    """Kimi Delta Attention -> one in_proj [q | k | v | b | f_a | g_a]. Moonshot's checkpoints (and
    transformers' save_pretrained) keep three convs and the forget gate's projections beside the others;
    transformers' in-memory module has one conv and a forget_gate submodule: both are accepted."""
    fg = a + ("forget_gate." if a + "forget_gate.f_a_proj.weight" in tensors else "")
    conv = (_take(tensors, a + "conv1d.weight") if a + "conv1d.weight" in tensors else
            torch.cat([_take(tensors, a + f"{p}_conv1d.weight") for p in "qkv"]))
    names = [a + "q_proj", a + "k_proj", a + "v_proj", a + "b_proj", fg + "f_a_proj", a + "g_a_proj"]
    return {d + "in_proj.weight": torch.cat([_take(tensors, n + ".weight") for n in names]),
            d + "f_b_proj.weight": _take(tensors, fg + "f_b_proj.weight"),
            d + "g_b_proj.weight": _take(tensors, a + "g_b_proj.weight"),
            d + "A_log": _take(tensors, fg + "A_log").reshape(-1),
            d + "dt_bias": _take(tensors, fg + "dt_bias").reshape(-1),
            d + "conv_weight": conv[:, 0],
            d + "norm_weight": _take(tensors, a + "o_norm.weight"), d + "o_proj.weight": _take(tensors, a + "o_proj.weight")}


def _experts(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert gate/up/down (released checkpoints) or transformers' fused 3-D tensors -> [E, 2I, D], [E, D, I]."""
    if m + "experts.gate_up_proj" in tensors:
        return tensors[m + "experts.gate_up_proj"], _take(tensors, m + "experts.down_proj")
    experts = range(cfg.moe["n_routed_experts"])
    # Mixtral-style names (Kimi Linear): w1 gate, w3 up, w2 down
    g, u, dn = ("w1", "w3", "w2") if f"{m}experts.0.w1.weight" in tensors else ("gate_proj", "up_proj", "down_proj")
    gate_up = torch.stack([torch.cat([_take(tensors, f"{m}experts.{e}.{g}.weight"),
                                      _take(tensors, f"{m}experts.{e}.{u}.weight")]) for e in experts])
    return gate_up, torch.stack([_take(tensors, f"{m}experts.{e}.{dn}.weight") for e in experts])


def _qwen_moe(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], m: str, d: str) -> dict[str, torch.Tensor]:
    gate_up, down = _experts(cfg, tensors, m)
    out = {d + "gate_weight": _take(tensors, m + "gate.weight"), d + "experts_gate_up": gate_up, d + "experts_down": down}
    if cfg.moe["shared_expert_intermediate_size"]:
        out.update(_swiglu(tensors, m + "shared_expert.", d + "shared_expert.", False))
        out[d + "shared_expert_gate.weight"] = _take(tensors, m + "shared_expert_gate.weight")
    return out


def _moe(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], m: str, d: str) -> dict[str, torch.Tensor]:
    """Per-expert gate/up/down (DeepSeek's checkpoints and transformers' save_pretrained) or already fused
    3-D experts.gate_up_proj / experts.down_proj -> stacked [E, 2I, D] / [E, D, I]."""
    gate_up, down = _experts(cfg, tensors, m)
    out = {d + "gate_weight": _take(tensors, m + "gate.weight"),
           d + "e_score_correction_bias": _take(tensors, m + "gate.e_score_correction_bias"),
           d + "experts_gate_up": gate_up, d + "experts_down": down}
    if cfg.moe["n_shared_experts"]:
        out.update(_swiglu(tensors, m + "shared_experts.", d + "shared_experts.", False))
    return out


def _swiglu(tensors: Mapping[str, torch.Tensor], m: str, d: str, bias: bool) -> dict[str, torch.Tensor]:
    if m + "gate_up_proj.weight" in tensors:  # already fused (MiniMax-M3), gate rows first
        gate_up = tensors[m + "gate_up_proj.weight"]
    else:
        gate_up = torch.cat([_take(tensors, m + "gate_proj.weight"), _take(tensors, m + "up_proj.weight")])
    out = {d + "gate_up_proj.weight": gate_up, d + "down_proj.weight": _take(tensors, m + "down_proj.weight")}
    if bias:
        out[d + "gate_up_proj.bias"] = torch.cat([_take(tensors, m + "gate_proj.bias"), _take(tensors, m + "up_proj.bias")])
        out[d + "down_proj.bias"] = _take(tensors, m + "down_proj.bias")
    return out


def _softmax_attention(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], a: str, d: str
                       ) -> dict[str, torch.Tensor]:
    """q/k/v fused into one qkv_proj (one weight read per step); a value scale folded into v's rows."""
    vs = cfg.value_scale
    out = {d + "qkv_proj.weight": torch.cat([_take(tensors, a + "q_proj.weight"), _take(tensors, a + "k_proj.weight"),
                                             _take(tensors, a + "v_proj.weight") * vs]),
           d + "o_proj.weight": _take(tensors, a + "o_proj.weight")}
    if cfg.attention_bias:
        out[d + "qkv_proj.bias"] = torch.cat([_take(tensors, a + "q_proj.bias"), _take(tensors, a + "k_proj.bias"),
                                              _take(tensors, a + "v_proj.bias") * vs])
        out[d + "o_proj.bias"] = _take(tensors, a + "o_proj.bias")
    if a + "attention_sink_bias" in tensors:  # MiMo's sliding layers
        out[d + "sinks"] = tensors[a + "attention_sink_bias"]
    if cfg.qk_norm:
        out[d + "q_norm.weight"] = _take(tensors, a + "q_norm.weight")
        out[d + "k_norm.weight"] = _take(tensors, a + "k_norm.weight")
    return out


def model_class(cfg: ModelConfig) -> type[DecoderLM]:
    """DecoderLM, or the subclass an architecture needs (GLM-5.3-Flash: mHC residual streams)."""
    return Glm5NextLM if cfg.architecture == "glm5_next" else DecoderLM


class _SkipRandomInit(TorchFunctionMode):
    """Build a model whose every parameter the checkpoint replaces: parameters are allocated (memory never
    touched, and handed back when the loaded tensors are assigned) but not randomly initialised; computed
    buffers (RoPE tables) are built for real. The meta device would skip the work too, but its first use
    imports torch._dynamo, about 1.5 s of every start-up."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # torch.nn.init's fills reach the mode as themselves (the ops they call then run unseen)
        if getattr(func, "__module__", None) == "torch.nn.init" or func in (torch.Tensor.normal_,
                                                                            torch.Tensor.uniform_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_model(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> DecoderLM:
    """Instantiate without initialising random weights, then adopt the loaded tensors."""
    state = convert_hf_state_dict(cfg, tensors)
    with _SkipRandomInit():
        model = model_class(cfg)(cfg)
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
