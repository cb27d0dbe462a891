"""Map transformers-named tensors onto our modules (fusing q/k/v and gate/up) and build the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.overrides import TorchFunctionMode

from attnzoo.errors import ModelLoadError
from attnzoo.mechanisms import attention_hf_weights, ffn, hyper
from attnzoo.mechanisms.common import take
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.glm5_next import Glm5NextLM
from attnzoo.models.mtp import mtp_block_config


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
    out = {"embed_tokens.weight": take(tensors, "model.embed_tokens.weight"),
           "norm.weight": take(tensors, "model.norm.weight")}
    out["lm_head.weight"] = out["embed_tokens.weight"] if cfg.tie_word_embeddings else take(tensors, "lm_head.weight")
    for i in range(cfg.num_layers):
        out.update(layer_hf_weights(cfg, tensors, i, f"layers.{i}."))
    for k in range(cfg.num_mtp_layers):
        out.update(mtp_hf_weights(cfg, tensors, k, out["lm_head.weight"]))
    return out


def layer_hf_weights(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], i: int, dst: str) -> dict[str, torch.Tensor]:
    """Decoder layer i's tensors (model.layers.i.*) under our prefix dst."""
    src, out = f"model.layers.{i}.", {}
    for norm in ("input_layernorm",) if cfg.parallel_block else ("input_layernorm", "post_attention_layernorm"):
        out[dst + norm + ".weight"] = take(tensors, src + norm + ".weight")
    out.update(attention_hf_weights(cfg, tensors, src, dst + "attn.", i))
    out.update(ffn.hf_weights(cfg, tensors, src, dst + "mlp.", i))
    if cfg.hyper is not None:
        out.update(hyper.hf_weights(cfg, tensors, src, dst, i))
    return out


def mtp_hf_weights(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], k: int, lm_head: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """MTP module k (model.layers.{num_layers + k}.*) -> mtp.k.*. Its copies of the embedding and of the LM
    head (shared_head.head) are not kept, the main model's serve; a shipped head that differs from the main
    lm_head is kept as the module's own."""
    i = cfg.num_layers + k
    src, dst = f"model.layers.{i}.", f"mtp.{k}."
    out = {dst + n: take(tensors, src + n) for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight")}
    out[dst + "norm.weight"] = take(tensors, src + "shared_head.norm.weight")
    head = tensors.get(src + "shared_head.head.weight")
    if head is not None and not torch.equal(head, lm_head):
        out[dst + "lm_head.weight"] = head
    return {**out, **layer_hf_weights(mtp_block_config(cfg), tensors, i, dst + "block.")}


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
        for k, layer in enumerate(model.mtp):   # an MTP head of its own (mtp_hf_weights keeps it where it differs)
            if f"mtp.{k}.lm_head.weight" in state:
                layer.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
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
