"""What `LLM` does before it can serve: check its options, load its model (in this process, or as shards across
tensor-parallel ranks: engine/tp.py) and check that deterministic mode can hold its promise for that model."""

from __future__ import annotations

import os

import torch

from attnzoo.engine.tp import TensorParallelGroup
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.registry import auto_quantization, load_model, resolve, resolve_dtype
from attnzoo.ops.attention.invariant import KEY_BLOCK
from attnzoo.ops.batch_invariant import check_gemm_invariance


def check_count(name: str, value: object, lo: int, hi: int | None = None, hi_is: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}{hi_is}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def check_options(page_size: int, max_num_seqs: int, max_num_batched_tokens: int, kv_cache_memory: int | None,
                  kv_cache_fraction: float | None, tensor_parallel_size: int) -> None:
    """Raise ValueError for an engine option out of range, before anything loads."""
    for name, value, lo in (("page_size", page_size, 1), ("max_num_seqs", max_num_seqs, 1),
                            ("max_num_batched_tokens", max_num_batched_tokens, 1),
                            ("tensor_parallel_size", tensor_parallel_size, 1)):
        check_count(name, value, lo)
    if kv_cache_memory is not None and kv_cache_fraction is not None:
        raise ValueError("give kv_cache_memory or kv_cache_fraction, not both")
    if kv_cache_memory is not None:
        check_count("kv_cache_memory (bytes)", kv_cache_memory, 1)
    if kv_cache_fraction is not None and (isinstance(kv_cache_fraction, bool) or not (
            isinstance(kv_cache_fraction, (int, float)) and 0 < kv_cache_fraction <= 1)):
        raise ValueError(f"kv_cache_fraction must be a number in (0, 1], got {kv_cache_fraction!r}")


def load_local(model: str | os.PathLike | DecoderLM, dtype: str | torch.dtype, device: torch.device,
               quantization: str, max_num_seqs: int, deterministic: bool) -> DecoderLM:
    """The model in this process, on `device`: loaded by name or path (dtype and quantization apply), or a
    passed-in model as it is."""
    if isinstance(model, DecoderLM):
        if quantization not in ("auto", "none"):
            raise ValueError("quantization applies when LLM loads the model; quantise a loaded model with "
                             "attnzoo.layers.quant.quantize_model")
    else:
        if deterministic and quantization in ("int4", "int8", "gguf"):
            raise ValueError("deterministic mode needs float weights (its batch-invariant matmuls): "
                             "use quantization='none'")
        model = load_model(model, dtype, device,
                           "none" if deterministic else auto_quantization(quantization, max_num_seqs))
    return model.to(device)


def start_tensor_parallel(model: str | os.PathLike | DecoderLM, dtype: str | torch.dtype, size: int,
                          deterministic: bool, quantization: str, device: torch.device) -> TensorParallelGroup:
    """Start `size` - 1 worker ranks; each rank, this one included, loads its shard of the checkpoint."""
    if quantization in ("int4", "int8", "gguf"):
        raise ValueError("tensor parallelism shards float weights: use quantization='none' (or 'auto')")
    if isinstance(model, DecoderLM):
        raise ValueError("tensor_parallel_size > 1 loads each rank's shard from the checkpoint: pass the path "
                         "of a transformers directory, not a loaded model")
    if deterministic:
        raise ValueError("deterministic mode runs in one process: it does not combine with tensor_parallel_size "
                         "> 1")
    path = resolve(model)
    if not (path.is_dir() and (path / "config.json").exists()):
        raise ValueError(f"tensor_parallel_size > 1 needs a transformers checkpoint directory (config.json + "
                         f"safetensors); {path} is not one")
    return TensorParallelGroup(path, size, resolve_dtype(dtype, device), device)


def check_deterministic(model: DecoderLM, device: torch.device, page_size: int) -> None:
    """Raise ValueError unless deterministic serving can hold its promise for this model here."""
    if device.type != "cpu":
        raise ValueError("deterministic mode runs on the CPU only (its batch-invariant GEMMs and attention are "
                         "CPU forms)")
    unsupported = sorted({type(layer.attn).__name__ for layer in model.layers
                          if not getattr(layer.attn, "batch_invariant", False)})
    if unsupported:
        raise ValueError(f"deterministic mode supports softmax-attention layers (full, sliding, sinks; dense or MoE "
                         f"MLPs); this model has {', '.join(unsupported)}")
    if KEY_BLOCK % page_size:
        raise ValueError(f"deterministic mode needs a page_size dividing {KEY_BLOCK}, got {page_size}")
    shapes = sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    check_gemm_invariance(shapes, model.embed_tokens.weight.dtype, trials=1)
