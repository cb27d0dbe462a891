"""Mixtures of SwiGLU experts (a loop over the experts a step uses).

DeepseekMoE (DeepSeek-V3, Kimi Linear): sigmoid router with a selection-only bias, group-limited top-k,
always-on shared experts. QwenMoE (Qwen3-Next): softmax router, top-k, one shared expert scaled by a
sigmoid gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.mlp import ClampedGLU, SwiGLU, glu


class DeepseekMoE(nn.Module):
    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int, top_k: int, *,
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, n_shared_experts: int = 1, clamp: ClampedGLU | None = None,
                 shared_intermediate_size: int | None = None):
        super().__init__()
        if n_routed_experts % n_group:
            raise ValueError(f"n_routed_experts {n_routed_experts} is not a multiple of n_group {n_group}")
        self.num_experts, self.top_k, self.n_group, self.topk_group = n_routed_experts, top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.intermediate, self.clamp = moe_intermediate_size, clamp
        # router stays float32 (as the checkpoint keeps it); the bias only steers selection, never weights
        self.gate_weight = nn.Parameter(torch.zeros(n_routed_experts, hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_routed_experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.experts_gate_up = nn.Parameter(torch.zeros(n_routed_experts, 2 * moe_intermediate_size, hidden_size))
        self.experts_down = nn.Parameter(torch.zeros(n_routed_experts, hidden_size, moe_intermediate_size))
        shared = shared_intermediate_size or moe_intermediate_size * n_shared_experts
        self.shared_experts = SwiGLU(hidden_size, shared, clamp=clamp) if n_shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] float32, expert ids [N, k])."""
        scores = F.linear(x.float(), self.gate_weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        n, E, G = x.shape[0], self.num_experts, self.n_group
        # a group's score is the sum of its two best experts; keep the topk_group best groups
        group_scores = choice.view(n, G, E // G).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // G, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.routed_scaling_factor, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.route(x)
        out = run_experts(x, w, ids, self.experts_gate_up, self.experts_down, self.clamp)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def run_experts(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, clamp: ClampedGLU | None = None) -> torch.Tensor:
    """sum_k w[:, k] * expert_{ids[:, k]}(x) for SwiGLU experts gate_up [E, 2I, D], down [E, D, I]."""
    out = torch.zeros_like(x)
    inter = down.shape[-1]
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[tok], gate_up[e]).split(inter, -1)
        y = F.linear(glu(gate, up, clamp), down[e]) * w[tok, slot, None].to(x.dtype)
        out.index_add_(0, tok, y)
    return out


class QwenMoE(nn.Module):
    def __init__(self, hidden_size: int, moe_intermediate_size: int, num_experts: int, top_k: int, *,
                 norm_topk_prob: bool = True, shared_expert_intermediate_size: int = 0):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate_weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.experts_gate_up = nn.Parameter(torch.zeros(num_experts, 2 * moe_intermediate_size, hidden_size))
        self.experts_down = nn.Parameter(torch.zeros(num_experts, hidden_size, moe_intermediate_size))
        self.shared_expert = SwiGLU(hidden_size, shared_expert_intermediate_size) if shared_expert_intermediate_size else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_intermediate_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x, self.gate_weight).softmax(-1, dtype=torch.float32)
        w, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        out = run_experts(x, w.to(x.dtype), ids, self.experts_gate_up, self.experts_down)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
