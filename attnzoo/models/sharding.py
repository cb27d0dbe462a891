"""Tensor parallelism's sharding rules, in one place: which mechanisms split, how each checkpoint tensor is
sliced, the sizes a rank's layers are built with, and the load that reads only a rank's slices.

Rules for N ranks (rank r):
    softmax attention   query heads split (q_proj rows, o_proj columns, sinks); KV heads split when N divides
                        them, else replicated: N must then be a multiple of the KV heads and rank r keeps KV
                        head r * Hkv // N (the one its query heads read); q/k norms replicated
    MLA                 query heads split (q_proj / q_b_proj and kv_b_proj rows, o_proj columns); the latent
                        path (q_a, kv_a, their norms) and the latent cache replicated on every rank
    DSA indexer         replicated: every rank scores and selects the same top-k (a split indexer would need
                        an all-reduce of the scores before top-k); its IndexerKeys cache is replicated
    Gated DeltaNet      key and value heads split (Qwen3-Next packs its projections per key head, so a
                        rank's slice is contiguous), with them the conv channels, A_log, dt_bias and the
                        recurrent-state pool; out_proj columns
    dense MLP           intermediate channels split (gate/up rows, down columns)
    MoE                 tensor parallel, not expert parallel: every rank holds every expert with 1/N of its
                        intermediate channels (and of the shared experts'); the router is replicated, so all
                        ranks route alike and the load is even whatever the routing; one all-reduce per layer
    embedding, LM head  vocabulary split in ceil(V/N) rows per rank (the last padded with zero rows)
Not split (refused with the reason): MSA, NSA, KDA (Kimi Linear, GLM-5.3-Flash), mHC residual streams.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from attnzoo.distributed import ParallelContext
from attnzoo.errors import ModelLoadError
from attnzoo.layers.delta import GatedDeltaNet
from attnzoo.layers.mlp import SwiGLU
from attnzoo.layers.moe import DeepseekMoE, QwenMoE
from attnzoo.layers.parallel import (ColumnParallelLinear, ParallelLMHead, ReducedOutput, RowParallelLinear,
                                     VocabParallelEmbedding, as_parallel)
from attnzoo.mechanisms import layer_mechanisms
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM

SPLIT_MECHANISMS = ("softmax", "mla", "dsa", "gdn")

Ranges = list[tuple[int, int]]


def kv_heads(cfg: ModelConfig, idx: int) -> int:
    sliding = cfg.layer_types[idx] == "sliding_attention"
    return cfg.sliding_num_kv_heads if sliding and cfg.sliding_num_kv_heads else cfg.num_kv_heads


def _problems(cfg: ModelConfig, n: int) -> list[str]:
    """Why n ranks cannot split cfg (empty: they can)."""
    out = []
    mechs = set(layer_mechanisms(cfg))
    if bad := sorted(mechs - set(SPLIT_MECHANISMS)):
        out.append(f"layers of kind {', '.join(bad)} have no tensor-parallel split (supported: "
                   f"{', '.join(SPLIT_MECHANISMS)})")
    if cfg.hyper is not None:
        out.append("mHC residual streams have no tensor-parallel split")
    if cfg.num_heads % n:
        out.append(f"num_attention_heads {cfg.num_heads}")
    for h in sorted({kv_heads(cfg, i) for i, m in enumerate(layer_mechanisms(cfg)) if m == "softmax"}):
        if h % n and n % h:
            out.append(f"num_key_value_heads {h} (N must divide it or be a multiple of it)")
    if "dense" in cfg.mlp_layer_types and cfg.intermediate_size % n:
        out.append(f"intermediate_size {cfg.intermediate_size}")
    if cfg.moe is not None and "sparse" in cfg.mlp_layer_types:
        m = cfg.moe
        for name, v in (("moe_intermediate_size", m.moe_intermediate_size),
                        ("shared_intermediate_size", m.shared_intermediate_size or 0),
                        ("shared_expert_intermediate_size", m.shared_expert_intermediate_size)):
            if v % n:
                out.append(f"{name} {v}")
    if "gdn" in mechs and (cfg.linear.num_k_heads % n or cfg.linear.num_v_heads % n):
        out.append(f"linear_num_key_heads {cfg.linear.num_k_heads} and linear_num_value_heads "
                   f"{cfg.linear.num_v_heads}")
    return out


def check_tensor_parallel(cfg: ModelConfig, n: object) -> None:
    """Raise ValueError unless n ranks can split this model, saying which sizes are allowed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {n!r}")
    problems = _problems(cfg, n)
    if problems:
        allowed = [k for k in range(1, cfg.num_heads + 1) if not _problems(cfg, k)]
        raise ValueError(f"tensor_parallel_size {n} cannot split this {cfg.architecture} model: it must divide "
                         f"{'; '.join(problems)}; allowed sizes for it: {', '.join(map(str, allowed))}")


def padded_vocab(cfg: ModelConfig, n: int) -> int:
    """Rows of each rank's vocabulary slice."""
    return -(-cfg.vocab_size // n)


def local_config(cfg: ModelConfig, ctx: ParallelContext) -> ModelConfig:
    """The sizes one rank's layers are built with (hidden size, head dims and the latent unchanged)."""
    n = ctx.world_size
    if n == 1:
        return cfg
    kw: dict = dict(num_heads=cfg.num_heads // n, num_kv_heads=max(1, cfg.num_kv_heads // n),
                    intermediate_size=cfg.intermediate_size // n if cfg.intermediate_size % n == 0
                    else cfg.intermediate_size, vocab_size=padded_vocab(cfg, n))
    if cfg.sliding_num_kv_heads:
        kw["sliding_num_kv_heads"] = max(1, cfg.sliding_num_kv_heads // n)
    if cfg.moe is not None:
        m = cfg.moe
        kw["moe"] = replace(m, moe_intermediate_size=m.moe_intermediate_size // n,
                            shared_intermediate_size=m.shared_intermediate_size // n if m.shared_intermediate_size
                            else None, shared_expert_intermediate_size=m.shared_expert_intermediate_size // n)
    if cfg.linear is not None:
        kw["linear"] = replace(cfg.linear, num_k_heads=cfg.linear.num_k_heads // n,
                               num_v_heads=cfg.linear.num_v_heads // n)
    return replace(cfg, **kw)


# ---- which slice of each checkpoint tensor a rank reads ---------------------------------------------------
def _even(ctx: ParallelContext, *segments: int) -> Ranges:
    """The dimension is the concatenation of `segments`, each split evenly: the rank's part of each."""
    out, base = [], 0
    for s in segments:
        a, b = ctx.shard(s)
        out.append((base + a, base + b))
        base += s
    return out


def _kv_rows(ctx: ParallelContext, heads: int, rows: int) -> Ranges:
    """K/V projection rows: the rank's heads, or the one replicated head its query heads read."""
    if heads % ctx.world_size == 0:
        return _even(ctx, rows)
    head, width = ctx.rank * heads // ctx.world_size, rows // heads
    return [(head * width, (head + 1) * width)]


def shard_ranges(name: str, shape: tuple[int, ...], cfg: ModelConfig, ctx: ParallelContext
                 ) -> tuple[int, Ranges] | None:
    """(dimension, ranges along it) of the rank's slice of a transformers-named tensor; None: replicated."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = padded_vocab(cfg, ctx.world_size)
        start = min(ctx.rank * rows, cfg.vocab_size)
        return 0, [(start, min(start + rows, cfg.vocab_size))]
    if not name.startswith("model.layers."):
        return None
    idx_s, rest = name[len("model.layers."):].split(".", 1)
    idx, last = int(idx_s), len(shape) - 1
    part, _, leaf = rest.rpartition(".")           # e.g. self_attn.q_proj / weight
    proj = part.rsplit(".", 1)[-1]
    if rest == "self_attn.attention_sink_bias" or rest in ("linear_attn.A_log", "linear_attn.dt_bias"):
        return 0, _even(ctx, shape[0])             # per head
    if part.startswith("self_attn"):
        if part in ("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_b_proj"):
            return 0, _even(ctx, shape[0])         # per query head, contiguous
        if part in ("self_attn.k_proj", "self_attn.v_proj"):
            return 0, _kv_rows(ctx, kv_heads(cfg, idx), shape[0])
        if part == "self_attn.o_proj" and leaf == "weight":
            return 1, _even(ctx, shape[1])
        return None                                # norms, the latent path, the DSA indexer: replicated
    if part.startswith("linear_attn"):
        c = cfg.linear
        if proj in ("in_proj_qkvz", "in_proj_ba", "in_proj_z", "in_proj_b", "in_proj_a"):
            return 0, _even(ctx, shape[0])         # Qwen3-Next packs per key head: a rank's slice is contiguous
        if proj in ("in_proj_qkv", "conv1d"):      # [q | k | v] channels
            return 0, _even(ctx, c.num_k_heads * c.k_dim, c.num_k_heads * c.k_dim, c.num_v_heads * c.v_dim)
        if proj == "out_proj":
            return 1, _even(ctx, shape[1])
        return None
    if part.startswith(("mlp", "block_sparse_moe")):
        if rest.endswith("experts.gate_up_proj"):          # transformers' fused experts [E, 2I, D]
            return 1, _even(ctx, shape[1] // 2, shape[1] // 2)
        if rest.endswith("experts.down_proj"):             # [E, D, I]
            return 2, _even(ctx, shape[2])
        if proj in ("gate_proj", "up_proj"):
            return 0, _even(ctx, shape[0])
        if proj == "gate_up_proj":                         # fused 2-D, gate rows first
            return 0, _even(ctx, shape[0] // 2, shape[0] // 2)
        if proj == "down_proj" and leaf == "weight":
            return last, _even(ctx, shape[last])
        return None                                        # routers, shared-expert gates, down biases
    return None


def read_slice(st, key: str, name: str, cfg: ModelConfig, ctx: ParallelContext) -> torch.Tensor:
    """The rank's slice of tensor `key` (`name`: its text-model name), read from the file without the rest."""
    sl = st.get_slice(key)
    rule = shard_ranges(name, tuple(sl.get_shape()), cfg, ctx) if ctx.is_parallel else None
    if rule is None:
        return st.get_tensor(key)
    dim, ranges = rule
    head = (slice(None),) * dim
    t = torch.cat([sl[head + (slice(a, b),)] for a, b in ranges], dim)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):   # pad the last rank's vocabulary slice
        rows = padded_vocab(cfg, ctx.world_size)
        if t.shape[0] < rows:
            t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return t


def load_hf_shard(path: Path, ctx: ParallelContext, dtype: torch.dtype = torch.float32) -> DecoderLM:
    """A transformers checkpoint directory -> this rank's part of the model (each tensor read as its slice).
    `model.config` stays the full model's; `model.local_config` is what the rank's layers were built with."""
    from attnzoo.models.hf_loader import checkpoint_files, config_from_hf
    from attnzoo.models.weights import build_model

    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}/config.json could not be read as JSON: {e}") from None
    if raw.get("model_type") == "attnzoo":
        raise ModelLoadError("tensor parallelism loads transformers checkpoints; attnzoo's own format is not "
                             "sharded yet")
    cfg = config_from_hf(raw)
    check_tensor_parallel(cfg, ctx.world_size)
    local = local_config(cfg, ctx)
    files = checkpoint_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(path / f), framework="pt") as st:
                keys = list(st.keys())
                multimodal = any(k.startswith("model.language_model.") for k in keys)
                for key in keys:
                    if multimodal and not key.startswith(("model.language_model.", "lm_head.")):
                        continue  # vision towers: not the text model
                    name = key.replace("model.language_model.", "model.", 1)
                    tensors[name] = read_slice(st, key, name, cfg, ctx)
        except Exception as e:  # safetensors raises several error types for missing/corrupt files
            raise ModelLoadError(f"{path / f} could not be read as safetensors: {e}") from None
    model = build_model(local, tensors, dtype)
    parallelize(model, cfg, ctx)
    model.config, model.local_config = cfg, local
    from attnzoo.models.tokenizer import Tokenizer
    model.tokenizer = Tokenizer.from_hf_dir(path, cfg)
    return model


def parallelize(model: DecoderLM, cfg: ModelConfig, ctx: ParallelContext) -> DecoderLM:
    """Give a model built from `local_config` its collectives: row-parallel outputs of attention and dense
    MLPs, one all-reduce on each MoE's output, the vocabulary-parallel embedding and LM head."""
    if not ctx.is_parallel:
        return model
    vp = padded_vocab(cfg, ctx.world_size)
    as_parallel(model.embed_tokens, VocabParallelEmbedding, ctx, vocab_start=ctx.rank * vp)
    as_parallel(model.lm_head, ParallelLMHead, ctx, vocab_size=cfg.vocab_size)
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        for name in ("qkv_proj", "q_proj", "q_b_proj", "kv_b_proj", "in_proj"):
            if isinstance(getattr(attn, name, None), torch.nn.Linear):
                as_parallel(getattr(attn, name), ColumnParallelLinear, ctx)
        out = attn.out_proj if isinstance(attn, GatedDeltaNet) else attn.o_proj
        as_parallel(out, RowParallelLinear, ctx)
        if isinstance(mlp, SwiGLU):
            as_parallel(mlp.gate_up_proj, ColumnParallelLinear, ctx)
            as_parallel(mlp.down_proj, RowParallelLinear, ctx)
        elif isinstance(mlp, (DeepseekMoE, QwenMoE)):
            mlp.register_forward_hook(ReducedOutput(ctx))
        else:
            raise ModelLoadError(f"no tensor-parallel split for {type(mlp).__name__}")
    return model
