"""Tensor parallelism's sharding, applied from the families' rules: each registered family declares how its
layers split (`Sharding` in attnzoo/mechanisms/registry.py, the rules in its module: softmax, mla, dsa,
delta_rule (Gated DeltaNet), ffn (dense MLP and MoE)) or declares none and is refused, by name (MSA, NSA,
KDA, mHC streams). This module applies them: which slice of each checkpoint tensor a rank reads, the
sizes its layers are built with, the load that reads only its slices, the collectives on the built model.

Model-wide rules for N ranks: query heads split (N divides num_attention_heads); embedding and LM head:
vocabulary split in ceil(V/N) rows per rank (the last padded with zero rows).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from attnzoo.distributed import ParallelContext
from attnzoo.errors import ModelLoadError
from attnzoo.layers.parallel import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                                     as_parallel)
from attnzoo.mechanisms import families, family_of, ffn
from attnzoo.mechanisms.registry import Family, Ranges, Sharding
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM


def _in_use(cfg: ModelConfig) -> dict[str, tuple[Family, list[int]]]:
    """The families this model uses (by its layers, or by a config set) and the layers each serves."""
    out: dict[str, tuple[Family, list[int]]] = {}
    for i in range(cfg.num_layers):
        f = family_of(cfg, i)
        out.setdefault(f.name, (f, []))[1].append(i)
    for f in families():
        if f.name not in out and f.field is not None and getattr(cfg, f.field) is not None:
            out[f.name] = (f, [])
    return out


def _refused(cfg: ModelConfig) -> list[str]:
    """What in cfg has no tensor-parallel split: families without rules, and what a family's rules refuse."""
    out = []
    for f, _ in _in_use(cfg).values():
        if f.sharding is None:
            out.append(f.title or f.name)
        elif f.sharding.refuse is not None and (why := f.sharding.refuse(cfg)):
            out.append(why)
    return out


def _problems(cfg: ModelConfig, n: int) -> list[str]:
    """The sizes n must divide and does not (empty: n ranks can split cfg)."""
    used = _in_use(cfg)
    out = [] if cfg.num_heads % n == 0 else [f"num_attention_heads {cfg.num_heads}"]
    used.setdefault(ffn.FAMILY.name, (ffn.FAMILY, []))   # every model has MLPs, MoE or not
    for f, layers in used.values():
        if f.sharding.problems is not None:
            out += f.sharding.problems(cfg, layers, n)
    return out


def check_tensor_parallel(cfg: ModelConfig, n: object) -> None:
    """Raise ValueError unless n ranks can split this model, saying why not or which sizes are allowed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {n!r}")
    if refused := _refused(cfg):
        split = [f.name for f in families() if f.sharding is not None and f.layer_types]
        raise ValueError(f"tensor parallelism cannot split this {cfg.architecture} model: there is no tensor-parallel "
                         f"split for {', '.join(refused)} (families that split: {', '.join(split)})")
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
    for f in families():
        if f.sharding is not None and f.sharding.local is not None and getattr(cfg, f.field) is not None:
            kw[f.field] = f.sharding.local(getattr(cfg, f.field), n)
    return cfg.evolve(**kw)


# ---- which slice of each checkpoint tensor a rank reads ---------------------------------------------------
def shard_ranges(name: str, shape: tuple[int, ...], cfg: ModelConfig, ctx: ParallelContext
                 ) -> tuple[int, Ranges] | None:
    """(dimension, ranges along it) of the rank's slice of a transformers-named tensor; None: replicated.
    A layer's tensors follow its MLP's rules or its attention family's."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = padded_vocab(cfg, ctx.world_size)
        start = min(ctx.rank * rows, cfg.vocab_size)
        return 0, [(start, min(start + rows, cfg.vocab_size))]
    if not name.startswith("model.layers."):
        return None
    idx_s, rest = name[len("model.layers."):].split(".", 1)
    idx = int(idx_s)
    family = ffn.FAMILY if rest.startswith(ffn.PREFIXES) else family_of(cfg, idx)
    return family.sharding.ranges(rest, shape, cfg, ctx, idx)


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
    from attnzoo.models.mtp import mtp_tensor
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
    mtp_skipped = 0
    for f in files:
        try:
            with safe_open(str(path / f), framework="pt") as st:
                keys = list(st.keys())
                multimodal = any(k.startswith("model.language_model.") for k in keys)
                for key in keys:
                    if multimodal and not key.startswith(("model.language_model.", "lm_head.")):
                        continue  # vision towers: not the text model
                    name = key.replace("model.language_model.", "model.", 1)
                    if mtp_tensor(name, cfg):   # MTP modules have no tensor-parallel split: not read
                        mtp_skipped += 1
                        continue
                    tensors[name] = read_slice(st, key, name, cfg, ctx)
        except Exception as e:  # safetensors raises several error types for missing/corrupt files
            raise ModelLoadError(f"{path / f} could not be read as safetensors: {e}") from None
    if mtp_skipped:
        logging.getLogger("attnzoo.models").info("tensor parallelism loads no MTP layers: %d tensors left unread",
                                                 mtp_skipped)
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
    for i, layer in enumerate(model.layers):
        _split(layer.attn, family_of(cfg, i).sharding, ctx)
        _split(layer.mlp, ffn.FAMILY.sharding, ctx)
    return model


def _split(module: torch.nn.Module, rules: Sharding, ctx: ParallelContext) -> None:
    """Turn a built module's linears into their tensor-parallel forms, as its family's rules say."""
    if rules.parallelize is not None:
        rules.parallelize(module, ctx)
        return
    for name in rules.columns:
        if isinstance(getattr(module, name, None), torch.nn.Linear):   # MLA: q_proj or q_b_proj
            as_parallel(getattr(module, name), ColumnParallelLinear, ctx)
    for name in rules.rows:
        as_parallel(getattr(module, name), RowParallelLinear, ctx)
