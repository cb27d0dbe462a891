"""Linear-attention layers on the gated delta rule (docs/mechanisms/delta_rule.md §2): Qwen3-Next / Qwen3.5's Gated
DeltaNet and Kimi Linear's Kimi Delta Attention.

Both: project, causal depthwise conv (kernel K, SiLU) over q|k|v, l2-normalised q/k, a decay g and a write
strength beta per token, the delta rule over a fixed-size state, a gated RMSNorm, the output projection.
They keep no per-token cache: each sequence carries the conv's last K-1 inputs and the state matrices
(a `RecurrentState` spec). With no cache (training, scoring) the states start at zero and are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.batch import Batch
from attnzoo.layers.cache_spec import RecurrentState
from attnzoo.ops.delta_rule import chunk_delta_rule, delta_rule_step


def causal_conv(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, cu_seqlens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over packed sequences that continue from their conv states.

    x [N, C] (sequence b is rows cu[b]:cu[b+1]), weight [C, K], conv_state [B, C, K-1] (each sequence's
    previous K-1 inputs, oldest first). Returns (y [N, C], new conv_state [B, C, K-1]).
    """
    N, C = x.shape
    K = weight.shape[1]
    B = cu_seqlens.numel() - 1
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(B, device=x.device), lens, output_size=N)
    # one buffer holding, per sequence, its K-1 carried inputs followed by its new tokens
    tok_rows = torch.arange(N, device=x.device) + (seq + 1) * (K - 1)
    starts = cu_seqlens[:-1].long() + torch.arange(B, device=x.device) * (K - 1)
    state_rows = (starts[:, None] + torch.arange(K - 1, device=x.device)).reshape(-1)
    ext = x.new_zeros(N + B * (K - 1), C)
    ext = ext.index_put((state_rows,), conv_state.transpose(1, 2).reshape(-1, C).to(x.dtype))
    ext = ext.index_put((tok_rows,), x)
    first = tok_rows - (K - 1)
    y = ext[first] * weight[:, 0]
    for j in range(1, K):
        y = y + ext[first + j] * weight[:, j]
    ends = cu_seqlens[1:].long() + (torch.arange(B, device=x.device) + 1) * (K - 1)
    new_state = ext[ends[:, None] - (K - 1) + torch.arange(K - 1, device=x.device)]  # [B, K-1, C]
    return F.silu(y), new_state.transpose(1, 2)


def _delta_rule(q, k, v, g, beta, state, cu_seqlens, decode: bool):
    """Decode steps (one token per sequence, a state to update) take the recurrent step; everything else
    the chunked form (the ops pick their kernels by device)."""
    if decode:
        return delta_rule_step(q, k, v, g, beta, state, use_qk_l2norm=True), state
    o, final = chunk_delta_rule(q[None], k[None], v[None], g[None], beta[None], initial_state=state,
                                use_qk_l2norm=True, cu_seqlens=cu_seqlens, output_final_state=True)
    return o[0], final


class DeltaRuleMixer(nn.Module):
    """What GDN and KDA share: the conv, the state bookkeeping and the choice of op."""

    def __init__(self, layer_idx: int, num_k_heads: int, num_v_heads: int, k_dim: int, v_dim: int, conv_width: int):
        super().__init__()
        if num_v_heads % num_k_heads:
            raise ValueError(f"value heads {num_v_heads} must be a multiple of key heads {num_k_heads}")
        self.layer_idx, self.num_k_heads, self.num_v_heads = layer_idx, num_k_heads, num_v_heads
        self.k_dim, self.v_dim, self.conv_width = k_dim, v_dim, conv_width
        self.conv_dim = 2 * num_k_heads * k_dim + num_v_heads * v_dim
        self.conv_weight = nn.Parameter(torch.zeros(self.conv_dim, conv_width))

    def cache_spec(self) -> RecurrentState:
        return RecurrentState(self.conv_dim, self.conv_width, self.num_v_heads, self.k_dim, self.v_dim)

    def mix(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """qkv [N, conv_dim] before the conv, g [N, Hv] or [N, Hv, dk] log-decay, beta [N, Hv] -> o [N, Hv, dv]."""
        n = qkv.shape[0]
        cu = batch.cu_seqlens
        B = cu.numel() - 1
        # state None: one full pass, nothing carried in (zero conv inputs, no initial state)
        conv_state, state = batch.recurrent_states(self.layer_idx, self.cache_spec(), qkv)
        y, conv_state = causal_conv(qkv, self.conv_weight, conv_state, cu)
        Hk, Hv, dk, dv = self.num_k_heads, self.num_v_heads, self.k_dim, self.v_dim
        q, k, v = y.split([Hk * dk, Hk * dk, Hv * dv], -1)
        q, k, v = q.view(n, Hk, dk), k.view(n, Hk, dk), v.reshape(n, Hv, dv)
        o, state = _delta_rule(q, k, v, g, beta, state, cu, decode=state is not None and n == B)
        batch.store_recurrent_states(self.layer_idx, conv_state, state)
        return o


class GatedDeltaNet(DeltaRuleMixer):
    """Qwen3-Next / Qwen3.5 GDN. One fused input projection [q | k | v | z | b | a] (Qwen3.5's split
    projections concatenated; Qwen3-Next's per-key-head packing is undone by the loader)."""

    def __init__(self, layer_idx: int, hidden_size: int, num_k_heads: int, num_v_heads: int, k_dim: int,
                 v_dim: int, conv_width: int = 4, norm_eps: float = 1e-6):
        super().__init__(layer_idx, num_k_heads, num_v_heads, k_dim, v_dim, conv_width)
        self.norm_eps = norm_eps
        self.split = [self.conv_dim, num_v_heads * v_dim, num_v_heads, num_v_heads]
        self.in_proj = nn.Linear(hidden_size, sum(self.split), bias=False)
        self.A_log = nn.Parameter(torch.zeros(num_v_heads))
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        self.norm_weight = nn.Parameter(torch.ones(v_dim))
        self.out_proj = nn.Linear(num_v_heads * v_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: object, batch: Batch) -> torch.Tensor:
        n = x.shape[0]
        qkv, z, b, a = self.in_proj(x).split(self.split, -1)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)   # log-decay <= 0, float32
        o = self.mix(qkv, g, beta, batch)
        # gated RMSNorm, norm before gate: w * norm(o) * silu(z)
        o32 = o.float()
        o = self.norm_weight * (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.norm_eps)).to(x.dtype)
        o = (o * F.silu(z.view(n, self.num_v_heads, self.v_dim).float())).to(x.dtype)
        return self.out_proj(o.reshape(n, -1))


class KimiDeltaAttention(DeltaRuleMixer):
    """Kimi Linear's KDA: per-key-channel decay from a low-rank forget gate, sigmoid low-rank output gate.
    One fused input projection [q | k | v | b | f_a | g_a].

    gate_lower_bound (GLM-5.3-Flash's "safe gate", e.g. -5): g = lb * sigmoid(exp(A_log) * (W_fb W_fa x +
    dt_bias)), so every per-step decay is >= e^lb; None keeps Kimi Linear's -exp(A_log) * softplus(.)."""

    def __init__(self, layer_idx: int, hidden_size: int, num_heads: int, head_dim: int, conv_width: int = 4,
                 norm_eps: float = 1e-6, gate_lower_bound: float | None = None):
        super().__init__(layer_idx, num_heads, num_heads, head_dim, head_dim, conv_width)
        self.norm_eps, self.gate_lower_bound = norm_eps, gate_lower_bound
        self.split = [self.conv_dim, num_heads, head_dim, head_dim]
        self.in_proj = nn.Linear(hidden_size, sum(self.split), bias=False)
        self.f_b_proj = nn.Linear(head_dim, num_heads * head_dim, bias=False)
        self.g_b_proj = nn.Linear(head_dim, num_heads * head_dim, bias=False)
        self.A_log = nn.Parameter(torch.zeros(num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(num_heads * head_dim))
        self.norm_weight = nn.Parameter(torch.ones(head_dim))
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: object, batch: Batch) -> torch.Tensor:
        n, H, d = x.shape[0], self.num_v_heads, self.v_dim
        qkv, b, f_a, g_a = self.in_proj(x).split(self.split, -1)
        beta = b.sigmoid()
        a = (self.f_b_proj(f_a).float() + self.dt_bias.float()).view(n, H, d)
        A = self.A_log.float().exp()[:, None]
        g = -A * F.softplus(a) if self.gate_lower_bound is None else self.gate_lower_bound * torch.sigmoid(A * a)
        o = self.mix(qkv, g, beta, batch).float()
        o = self.norm_weight.float() * o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        o = (o * torch.sigmoid(self.g_b_proj(g_a).float().view(n, H, d))).to(x.dtype)
        return self.o_proj(o.reshape(n, -1))
