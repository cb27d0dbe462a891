from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.batch import Batch
from attnzoo.layers.cache_spec import FullKV, SlidingKV
from attnzoo.layers.norm import RMSNorm
from attnzoo.ops.rope import apply_rope


class Attention(nn.Module):
    """Softmax attention for MHA / GQA / MQA (by head ratio), optional sliding window, sinks, per-head
    q/k RMSNorm (Qwen3) and a sigmoid output gate (Qwen3-Next: the query projection yields [q | gate] per
    head, o <- o * sigmoid(gate) before o_proj). q, k and v come from one fused projection."""

    # Its ops have batch-invariant forms (ops.batch_invariant): deterministic serving supports this layer.
    batch_invariant = True

    def __init__(self, layer_idx: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 bias: bool = False, o_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 window: int | None = None, sinks: bool = False, use_rope: bool = True,
                 interleaved_rope: bool = False, output_gate: bool = False, v_head_dim: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, num_heads, num_kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.window, self.use_rope, self.interleaved_rope = window, use_rope, interleaved_rope
        self.output_gate = output_gate
        q_width = num_heads * head_dim * (2 if output_gate else 1)
        self.qkv_proj = nn.Linear(hidden_size, q_width + num_kv_heads * (head_dim + self.v_head_dim), bias=bias)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None

    def cache_spec(self) -> FullKV:
        dv = None if self.v_head_dim == self.head_dim else self.v_head_dim
        if self.window is not None:
            return SlidingKV(self.num_kv_heads, self.head_dim, dv, window=self.window)
        return FullKV(self.num_kv_heads, self.head_dim, dv)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [N, hidden] -> q [N, H, d], k, v [N, Hkv, d] (normed, roped) and the output gate (or None)."""
        n, d, H, Hkv = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        q_width = H * d * (2 if self.output_gate else 1)
        qkv = self.qkv_proj(x)
        rope = rope if self.use_rope else None
        v = qkv[:, q_width + Hkv * d:].view(n, Hkv, self.v_head_dim)
        if rope is not None and not self.output_gate and self.q_norm is None:
            # q and k are adjacent in the projection: one rotation over both (half a decode step's rope ops)
            qk = apply_rope(qkv[:, :q_width + Hkv * d].view(n, H + Hkv, d), *rope, interleaved=self.interleaved_rope)
            q, k = qk.split([H, Hkv], 1)
            return q, k, v, None
        q, k = qkv[:, :q_width], qkv[:, q_width:q_width + Hkv * d].view(n, Hkv, d)
        gate = None
        if self.output_gate:
            q, gate = q.view(n, H, 2 * d).split(d, -1)
        q = q.reshape(n, H, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(torch.cat((q, k), 1), *rope, interleaved=self.interleaved_rope).split([H, Hkv], 1)
        return q, k, v, gate

    def output(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o.reshape(o.shape[0], self.num_heads * self.v_head_dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        q, k, v, gate = self.project(x, rope)
        # transformers' sliding_window=W means W keys including the query: flash-attn window (W-1, 0)
        window = (self.window - 1, 0) if self.window is not None else (-1, -1)
        return self.output(batch.attend(self.layer_idx, q, k, v, window_size=window, sinks=self.sinks), gate)
