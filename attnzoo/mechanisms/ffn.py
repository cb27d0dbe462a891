"""The feed-forward half of a layer: a dense SwiGLU (optionally clamped: GPT-OSS, MiniMax-M3, GLM-5.3-Flash)
or a mixture of experts (DeepSeek's sigmoid routing with groups and shared experts, or Qwen's softmax
routing with a gated shared expert). Left out of the arena's cost columns: the same in every contestant.
Not a layer type: every decoder layer has one (mechanisms.build_ffn); registered for its config (`moe`)
and its tensor-parallel rules:
    dense MLP   intermediate channels split (gate/up rows, down columns)
    MoE         tensor parallel, not expert parallel: every rank holds every expert with 1/N of its
                intermediate channels (and of the shared experts'); the router is replicated, so all ranks
                route alike and the load is even whatever the routing; one all-reduce per layer
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from attnzoo.errors import ModelLoadError
from attnzoo.layers import DeepseekMoE, SwiGLU
from attnzoo.layers.mlp import ClampedGLU
from attnzoo.layers.moe import QwenMoE
from attnzoo.layers.parallel import ColumnParallelLinear, ReducedOutput, RowParallelLinear, as_parallel
from attnzoo.mechanisms.common import Tensors, even, take
from attnzoo.mechanisms.registry import Family, Ranges, Sharding

if TYPE_CHECKING:
    from attnzoo.distributed import ParallelContext
    from attnzoo.models.config import ModelConfig

PREFIXES = ("mlp.", "block_sparse_moe.")   # a layer's MLP tensors in transformers' names


@dataclass
class Config:
    """MoE sizes; dense layers use ModelConfig.intermediate_size (and mlp_clamp, mlp_bias)."""
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    kind: str = "deepseek"          # deepseek | qwen
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0  # dense layers before the first MoE one
    shared_intermediate_size: int | None = None   # deepseek: the shared experts' width when it differs
    shared_expert_intermediate_size: int = 0      # qwen: the gated shared expert (0: none)

    def __post_init__(self) -> None:
        if self.kind not in ("deepseek", "qwen"):
            raise ValueError(f"MoE kind must be deepseek or qwen, got {self.kind!r}")


# ---- transformers configs: each family spells its experts its own way (None: a dense model) --------------
def deepseek_moe(raw: dict[str, Any]) -> Config:
    """DeepSeek-V3 / V3.2, GLM-5 (transformers' defaults: DeepSeek-V3's)."""
    return Config(**{k: raw.get(k, d) for k, d in (
        ("n_routed_experts", 256), ("num_experts_per_tok", 8), ("moe_intermediate_size", 2048), ("n_group", 8),
        ("topk_group", 4), ("norm_topk_prob", True), ("routed_scaling_factor", 2.5), ("n_shared_experts", 1),
        ("first_k_dense_replace", 3))})


def kimi_moe(raw: dict[str, Any]) -> Config | None:
    experts = raw.get("num_experts", raw.get("num_local_experts", 0))
    return None if not experts else Config(
        n_routed_experts=experts,
        num_experts_per_tok=raw.get("num_experts_per_token", raw.get("num_experts_per_tok", 1)),
        moe_intermediate_size=raw["moe_intermediate_size"],
        n_group=raw.get("num_expert_group", raw.get("n_group", 1)) or 1, topk_group=raw.get("topk_group", 1) or 1,
        norm_topk_prob=raw.get("moe_renormalize", raw.get("norm_topk_prob", True)),
        routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
        n_shared_experts=raw.get("num_shared_experts", raw.get("n_shared_experts", 0)) or 0)


def qwen_moe(raw: dict[str, Any]) -> Config | None:
    """Qwen3-Next: softmax routing, a gated shared expert."""
    experts = raw.get("num_experts", 0)
    return None if not experts else Config(
        kind="qwen", n_routed_experts=experts, num_experts_per_tok=raw["num_experts_per_tok"],
        moe_intermediate_size=raw["moe_intermediate_size"], norm_topk_prob=raw.get("norm_topk_prob", True),
        shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 0))


def mimo_moe(raw: dict[str, Any]) -> Config | None:
    """MiMo-V2-Flash: DeepSeek-style routing without shared experts."""
    experts = raw.get("n_routed_experts", 0)
    return None if not experts else Config(
        n_routed_experts=experts, num_experts_per_tok=raw.get("num_experts_per_tok", 8),
        moe_intermediate_size=raw["moe_intermediate_size"], n_group=raw.get("n_group", 1) or 1,
        topk_group=raw.get("topk_group", 1) or 1, norm_topk_prob=raw.get("norm_topk_prob", True),
        routed_scaling_factor=raw.get("routed_scaling_factor", 1.0) or 1.0, n_shared_experts=0)


def minimax_moe(raw: dict[str, Any]) -> Config | None:
    """MiniMax-M3: its intermediate_size is the experts' width."""
    experts = raw.get("num_local_experts", 0)
    return None if not experts else Config(
        n_routed_experts=experts, num_experts_per_tok=raw.get("num_experts_per_tok", 8),
        moe_intermediate_size=raw["intermediate_size"], n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=raw.get("routed_scaling_factor", 1.0), n_shared_experts=1,
        shared_intermediate_size=raw.get("shared_intermediate_size", raw["intermediate_size"]))


def glm5_next_moe(raw: dict[str, Any]) -> Config:
    return Config(n_routed_experts=raw.get("n_routed_experts", 288),
                  num_experts_per_tok=raw.get("num_experts_per_tok", 8),
                  moe_intermediate_size=raw.get("moe_intermediate_size", 2048), n_group=raw.get("n_group", 1) or 1,
                  topk_group=raw.get("topk_group", 1) or 1, norm_topk_prob=raw.get("norm_topk_prob", True),
                  routed_scaling_factor=raw.get("routed_scaling_factor", 2.5),
                  n_shared_experts=raw.get("n_shared_experts", 1) or 0)


def build(cfg: ModelConfig, idx: int) -> SwiGLU | DeepseekMoE | QwenMoE:
    clamp = ClampedGLU(*cfg.mlp_clamp) if cfg.mlp_clamp else None
    e, D = cfg.moe, cfg.hidden_size
    if cfg.mlp_layer_types[idx] == "dense":
        return SwiGLU(D, cfg.intermediate_size, bias=cfg.mlp_bias, clamp=clamp)
    if e.kind == "qwen":
        return QwenMoE(D, e.moe_intermediate_size, e.n_routed_experts, e.num_experts_per_tok,
                       norm_topk_prob=e.norm_topk_prob, shared_expert_intermediate_size=e.shared_expert_intermediate_size)
    return DeepseekMoE(D, e.moe_intermediate_size, e.n_routed_experts, e.num_experts_per_tok, n_group=e.n_group,
                       topk_group=e.topk_group, norm_topk_prob=e.norm_topk_prob,
                       routed_scaling_factor=e.routed_scaling_factor, n_shared_experts=e.n_shared_experts, clamp=clamp,
                       shared_intermediate_size=e.shared_intermediate_size)


def hf_weights(cfg: ModelConfig, tensors: Tensors, src: str, dst: str, idx: int) -> dict[str, torch.Tensor]:
    """src: the layer's prefix (model.layers.N.); dst: the MLP's (layers.N.mlp.)."""
    m = src + (PREFIXES[1] if src + "block_sparse_moe.gate_proj.weight" in tensors
               or src + "block_sparse_moe.gate.weight" in tensors else PREFIXES[0])  # Kimi Linear's name
    if cfg.mlp_layer_types[idx] == "dense":
        return swiglu_weights(tensors, m, dst, cfg.mlp_bias)
    gate_up, down = _experts(cfg, tensors, m)
    out = {dst + "gate_weight": take(tensors, m + "gate.weight"), dst + "experts_gate_up": gate_up,
           dst + "experts_down": down}
    if cfg.moe.kind == "qwen":
        if cfg.moe.shared_expert_intermediate_size:
            out.update(swiglu_weights(tensors, m + "shared_expert.", dst + "shared_expert.", False))
            out[dst + "shared_expert_gate.weight"] = take(tensors, m + "shared_expert_gate.weight")
        return out
    out[dst + "e_score_correction_bias"] = take(tensors, m + "gate.e_score_correction_bias")
    if cfg.moe.n_shared_experts:
        out.update(swiglu_weights(tensors, m + "shared_experts.", dst + "shared_experts.", False))
    return out


def _experts(cfg: ModelConfig, tensors: Tensors, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert gate/up/down (released checkpoints) or transformers' fused 3-D tensors -> [E, 2I, D], [E, D, I]."""
    if m + "experts.gate_up_proj" in tensors:
        return tensors[m + "experts.gate_up_proj"], take(tensors, m + "experts.down_proj")
    experts = range(cfg.moe.n_routed_experts)
    # Mixtral-style names (Kimi Linear): w1 gate, w3 up, w2 down
    g, u, dn = ("w1", "w3", "w2") if f"{m}experts.0.w1.weight" in tensors else ("gate_proj", "up_proj", "down_proj")
    gate_up = torch.stack([torch.cat([take(tensors, f"{m}experts.{e}.{g}.weight"),
                                      take(tensors, f"{m}experts.{e}.{u}.weight")]) for e in experts])
    return gate_up, torch.stack([take(tensors, f"{m}experts.{e}.{dn}.weight") for e in experts])


def swiglu_weights(tensors: Tensors, m: str, d: str, bias: bool) -> dict[str, torch.Tensor]:
    if m + "gate_up_proj.weight" in tensors:  # already fused (MiniMax-M3), gate rows first
        gate_up = tensors[m + "gate_up_proj.weight"]
    else:
        gate_up = torch.cat([take(tensors, m + "gate_proj.weight"), take(tensors, m + "up_proj.weight")])
    out = {d + "gate_up_proj.weight": gate_up, d + "down_proj.weight": take(tensors, m + "down_proj.weight")}
    if bias:
        out[d + "gate_up_proj.bias"] = torch.cat([take(tensors, m + "gate_proj.bias"), take(tensors, m + "up_proj.bias")])
        out[d + "down_proj.bias"] = take(tensors, m + "down_proj.bias")
    return out


# ---- tensor parallelism (see the module docstring) -------------------------------------------------------
def shard_ranges(rest: str, shape: tuple[int, ...], cfg: ModelConfig, ctx: ParallelContext, idx: int
                 ) -> tuple[int, Ranges] | None:
    part, _, leaf = rest.rpartition(".")
    proj, last = part.rsplit(".", 1)[-1], len(shape) - 1
    if rest.endswith("experts.gate_up_proj"):          # transformers' fused experts [E, 2I, D]
        return 1, even(ctx, shape[1] // 2, shape[1] // 2)
    if rest.endswith("experts.down_proj"):             # [E, D, I]
        return 2, even(ctx, shape[2])
    if proj in ("gate_proj", "up_proj"):
        return 0, even(ctx, shape[0])
    if proj == "gate_up_proj":                         # fused 2-D, gate rows first
        return 0, even(ctx, shape[0] // 2, shape[0] // 2)
    if proj == "down_proj" and leaf == "weight":
        return last, even(ctx, shape[last])
    return None                                        # routers, shared-expert gates, down biases


def shard_problems(cfg: ModelConfig, layers: list[int], n: int) -> list[str]:
    out = []
    if "dense" in cfg.mlp_layer_types and cfg.intermediate_size % n:
        out.append(f"intermediate_size {cfg.intermediate_size}")
    if cfg.moe is not None and "sparse" in cfg.mlp_layer_types:
        m = cfg.moe
        for name, v in (("moe_intermediate_size", m.moe_intermediate_size),
                        ("shared_intermediate_size", m.shared_intermediate_size or 0),
                        ("shared_expert_intermediate_size", m.shared_expert_intermediate_size)):
            if v % n:
                out.append(f"{name} {v}")
    return out


def shard_local(m: Config, n: int) -> Config:
    return replace(m, moe_intermediate_size=m.moe_intermediate_size // n,
                   shared_intermediate_size=m.shared_intermediate_size // n if m.shared_intermediate_size else None,
                   shared_expert_intermediate_size=m.shared_expert_intermediate_size // n)


def parallelize(mlp: nn.Module, ctx: ParallelContext) -> None:
    if isinstance(mlp, SwiGLU):
        as_parallel(mlp.gate_up_proj, ColumnParallelLinear, ctx)
        as_parallel(mlp.down_proj, RowParallelLinear, ctx)
    elif isinstance(mlp, (DeepseekMoE, QwenMoE)):
        mlp.register_forward_hook(ReducedOutput(ctx))
    else:
        raise ModelLoadError(f"no tensor-parallel split for {type(mlp).__name__}")


FAMILY = Family("ffn", title="the MLP", config=Config, field="moe",
                sharding=Sharding(shard_ranges, problems=shard_problems, local=shard_local, parallelize=parallelize))
