"""The per-step description every layer sees, and the simple contiguous KV cache.

Layers take a packed token stream `x: [N, hidden]` plus a `Batch`. They never branch on training vs
serving: they hand their q/k/v to `batch.attend`, which either attends within the packed sequences
(no cache: training, scoring) or asks the cache to store the new K/V and read what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from attnzoo.layers.cache_spec import RecurrentState
from attnzoo.ops import attention


class KVCache(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: "Batch", *,
               window_size: tuple[int, int], scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """Store k/v [N, Hkv, d] for this step's tokens, attend q [N, H, d] causally; return [N, H, dv]."""
        ...

    def recurrent_states(self, layer_idx: int, spec: RecurrentState, like: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's sequences' states in batch order (zero for a fresh sequence): conv [B, conv_dim, K-1]
        (like's dtype) and state [B, H, dk, dv] float32. The layer may update them in place."""
        ...

    def store_recurrent_states(self, layer_idx: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        """Keep the states the sequences carry into their next step."""
        ...


@dataclass
class Batch:
    positions: torch.Tensor       # [N] int64: absolute position of each new token
    cu_seqlens: torch.Tensor      # [B+1] int32: new tokens of sequence i are rows cu[i]:cu[i+1]
    cache: KVCache | None = None
    logits_rows: torch.Tensor | None = None  # rows whose logits are needed (None: all)
    shared: dict = field(default_factory=dict)  # values a layer passes to later layers in this step
                                                 # (IndexShare: the selection of the last full indexer)

    @classmethod
    def dense(cls, batch_size: int, seq_len: int, start: int = 0, device: torch.device | str = "cpu",
              cache: KVCache | None = None) -> "Batch":
        """B sequences of equal length T, their new tokens at positions start..start+T-1."""
        pos = torch.arange(start, start + seq_len, device=device).repeat(batch_size)
        cu = torch.arange(0, (batch_size + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
        return cls(positions=pos, cu_seqlens=cu, cache=cache)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               window_size: tuple[int, int] = (-1, -1), scale: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.attend(layer_idx, q, k, v, self, window_size=window_size, scale=scale, sinks=sinks)
        return attention(q, k, v, causal=True, window_size=window_size, scale=scale, sinks=sinks,
                         cu_seqlens_q=self.cu_seqlens, cu_seqlens_k=self.cu_seqlens)


@dataclass
class ContiguousKVCache:
    """One [B, max_len, Hkv, d] buffer per layer for B sequences that advance in lock step.

    The reference generation path (and the engine's oracle); the engine's paged cache replaces it
    for serving. `length` is the number of tokens already stored; the model advances it after a step.
    """
    batch_size: int
    max_len: int
    length: int = 0
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def recurrent_states(self, layer_idx: int, spec: RecurrentState, like: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Delta-rule layers: (conv state [B, conv_dim, K-1], state [B, H, dk, dv] float32), zero at first."""
        if layer_idx not in self.states:
            B = self.batch_size
            self.states[layer_idx] = (
                like.new_zeros(B, spec.conv_dim, spec.conv_width - 1),
                torch.zeros(B, spec.num_heads, spec.k_dim, spec.v_dim, dtype=torch.float32, device=like.device))
        return self.states[layer_idx]

    def store_recurrent_states(self, layer_idx: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.states[layer_idx] = (conv, state)

    def append_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B*n, Hkv, d] of the new tokens; return the layer's K and V so far [B, length + n, Hkv, d]."""
        B = self.batch_size
        n = k.shape[0] // B
        if self.length + n > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length} stored + {n} new do not fit")
        if layer_idx not in self.keys:
            self.keys[layer_idx] = k.new_empty(B, self.max_len, *k.shape[1:])
            self.values[layer_idx] = v.new_empty(B, self.max_len, *v.shape[1:])
        end = self.length + n
        self.keys[layer_idx][:, self.length:end] = k.view(B, n, *k.shape[1:])
        self.values[layer_idx][:, self.length:end] = v.view(B, n, *v.shape[1:])
        return self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, *,
               window_size: tuple[int, int], scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        B = self.batch_size
        n = q.shape[0] // B
        kc, vc = self.append_kv(layer_idx, k, v)
        out = attention(q.view(B, n, *q.shape[1:]), kc, vc, causal=True, window_size=window_size, scale=scale,
                        sinks=sinks)
        return out.reshape(B * n, *out.shape[2:])

    rows: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def append_rows(self, layer_idx: int, kind: str, new: torch.Tensor) -> torch.Tensor:
        """One row per token shared by all heads (kind "latent": MLA; "indexer": DSA's indexer keys):
        store new [B, n, D] and return the layer's rows so far [B, length + n, D]."""
        B, n = new.shape[:2]
        if self.length + n > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length} stored + {n} new do not fit")
        if (layer_idx, kind) not in self.rows:
            self.rows[(layer_idx, kind)] = new.new_empty(B, self.max_len, *new.shape[2:])
        end = self.length + n
        self.rows[(layer_idx, kind)][:, self.length:end] = new
        return self.rows[(layer_idx, kind)][:, :end]
