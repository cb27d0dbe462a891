"""The per-step description every layer sees, and the one cache handle layers talk to.

Layers take a packed token stream `x: [N, hidden]` plus a `Batch`. They never branch on training vs
serving, nor on which cache serves them: they call the Batch, which forwards to its cache handle
(`KVCache`): `NoCache` for one full pass (training, scoring), `ContiguousKVCache` for the reference
generator, the paged engine's per-step handle (attnzoo/engine/step.py) for serving.

  * `attend(...)`: softmax attention; the handle stores the new K/V and runs its own fast path.
  * `store(layer, spec, *new) -> Context`: store this step's rows of one spec and get back what the
    layer's queries attend over: the stored tokens and `Span`s (query rows -> key rows). Layers that run
    their own attention (MLA, DSA, MSA) use this.
  * `recurrent_states` / `store_recurrent_states`: the delta-rule layers' per-sequence states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from attnzoo.layers.cache_spec import CacheKind, CacheSpec, RecurrentState
from attnzoo.ops import attention


@dataclass
class Span:
    """R groups of T queries that are the LAST T positions of their sequences (causal, bottom-right
    aligned), and the stored tokens each group sees, in position order."""
    rows: torch.Tensor                        # [R, T] query rows of the step
    keys: torch.Tensor                        # [R, L] indices into the Context's token axis
    valid: torch.Tensor | None = None         # [R, L] bool: a real key, not padding of a ragged batch (None: all)
    cu_seqlens: torch.Tensor | None = None    # packed (no cache): R == 1 covers every row of the step in order,
                                              # each sequence attends to itself; [B+1] boundaries
    block_table: torch.Tensor | None = None   # paged decode (T == 1): each row's pages [R, P] and key counts
    seq_lens: torch.Tensor | None = None      # [R], for kernels that read the pages in place

    @property
    def single_query(self) -> bool:
        """One query per sequence (decode)."""
        return self.cu_seqlens is None and self.rows.shape[1] == 1

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The span's queries of x [N, ...]: [R, T, ...], or x itself when packed (then pass cu_seqlens)."""
        return x if self.cu_seqlens is not None else x[self.rows]

    def put(self, out: torch.Tensor, value: torch.Tensor) -> None:
        """Write value (shaped as `take` gives) into out [N, ...] at the span's query rows."""
        out[self.rows.flatten()] = value.reshape(-1, *out.shape[1:]).to(out.dtype)

    def unpacked(self) -> list["Span"]:
        """Spans with no packing: a packed span becomes one span per sequence (for batched ops)."""
        if self.cu_seqlens is None:
            return [self]
        cu = self.cu_seqlens.tolist()
        return [Span(self.rows[:, a:b], self.keys[:, a:b]) for a, b in zip(cu[:-1], cu[1:]) if b > a]

    def per_sequence(self) -> list["Span"]:
        """One span per sequence holding exactly its keys (no padding mask; for ops that take none)."""
        out = []
        for s in self.unpacked():
            for r in range(s.rows.shape[0]):
                keys = s.keys[r] if s.valid is None else s.keys[r][s.valid[r]]
                out.append(Span(s.rows[r:r + 1], keys[None]))
        return out


def stack_equal(spans: list[Span]) -> list[Span]:
    """Spans of one sequence each (`per_sequence`, or unpacked ones with no padding), those with equal query
    and key counts stacked into one span: a batched op then runs once per shape, not once per sequence
    (a training batch of equal-length sequences becomes one span). Others pass through unchanged."""
    plain, other = [], []
    for s in spans:
        (plain if s.valid is None and s.cu_seqlens is None and s.block_table is None else other).append(s)
    return [g[0] for g in stack_aligned(plain)] + other


def stack_aligned(*lists: list[Span]) -> list[tuple[Span, ...]]:
    """Like `stack_equal` for a layer that reads several stores per sequence (NSA: its raw rows and its
    compressed rows): the i-th span of every list is sequence i's, one sequence each with no padding; the
    sequences whose spans all have equal shapes are stacked together, list by list."""
    groups: dict[tuple[int, ...], list[tuple[Span, ...]]] = {}
    for seq in zip(*lists, strict=True):
        groups.setdefault((seq[0].rows.shape[1], *(s.keys.shape[1] for s in seq)), []).append(seq)
    return [tuple(g[0] if len(g) == 1 else Span(torch.cat([s.rows for s in g]), torch.cat([s.keys for s in g]))
                  for g in zip(*seqs)) for seqs in groups.values()]


@dataclass
class Context:
    """What one layer reads for one spec this step: its stored tokens and the spans its queries attend
    over. Row kinds (LATENT, INDEX_KEYS, ROWS, COMPRESSED) fill `rows` (COMPRESSED: the spans name each
    sequence's completed compression blocks in order); KV fills `k`/`v` (head-major, the paged pool's
    layout: a view, no copy)."""
    spans: list[Span]
    rows: torch.Tensor | None = None    # [S, D] one row per stored token
    k: torch.Tensor | None = None       # [Hkv, S, d]
    v: torch.Tensor | None = None       # [Hkv, S, dv]
    pages: torch.Tensor | None = None   # rows by page [pages, page_size, D] (paged engine), for Span.block_table

    def gather(self, span: Span) -> torch.Tensor:
        """Rows of the span's keys: [R, L, D] (packed: [N, D])."""
        return self.rows if span.cu_seqlens is not None else self.rows[span.keys]

    def paged(self, span: Span) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The span's keys for kernels that read rows in place: (pages [P, page_size, D], block table [R, P],
        key counts [R]): the paged engine's pages, else the stored rows as pages of one token. Spans without a
        block table carry no padding (only the paged engine pads a decode batch)."""
        if span.block_table is not None:
            return self.pages, span.block_table, span.seq_lens
        R, L = span.keys.shape
        return self.rows[:, None], span.keys, span.keys.new_full((R,), L)

    def gather_kv(self, span: Span) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the span's keys: [R, L, Hkv, d] (packed: [N, Hkv, d])."""
        if span.cu_seqlens is not None:
            return self.k.transpose(0, 1), self.v.transpose(0, 1)
        return self.k[:, span.keys].permute(1, 2, 0, 3), self.v[:, span.keys].permute(1, 2, 0, 3)


class KVCache(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: "Batch", *,
               window_size: tuple[int, int], scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        """Store k/v [N, Hkv, d] for this step's tokens, attend q [N, H, d] causally; return [N, H, dv]."""
        ...

    def store(self, layer_idx: int, spec: CacheSpec, *new: torch.Tensor) -> Context:
        """Store this step's tokens of one spec (rows [N, D]; KV: k [N, Hkv, d], v [N, Hkv, dv]); return
        the layer's context. Raises for a spec the cache cannot hold (CacheKind.UNSERVED)."""
        ...

    def recurrent_states(self, layer_idx: int, spec: RecurrentState, like: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's sequences' states in batch order: conv [B, conv_dim, K-1] (like's dtype) and state
        [B, H, dk, dv] float32, zero for a fresh sequence; state None when nothing is carried (no cache).
        The layer may update them in place."""
        ...

    def store_recurrent_states(self, layer_idx: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        """Keep the states the sequences carry into their next step."""
        ...


@dataclass
class NoCache:
    """One full pass (training, scoring): every sequence attends within the step's packed tokens and
    nothing is kept."""
    cu_seqlens: torch.Tensor

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: "Batch", *,
               window_size: tuple[int, int], scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        return attention(q, k, v, causal=True, window_size=window_size, scale=scale, sinks=sinks,
                         cu_seqlens_q=self.cu_seqlens, cu_seqlens_k=self.cu_seqlens)

    def store(self, layer_idx: int, spec: CacheSpec, *new: torch.Tensor) -> Context:
        if spec.kind is CacheKind.UNSERVED:  # one full pass keeps nothing, so any mechanism runs
            return Context([])
        n = new[0].shape[0]
        rows = torch.arange(n, device=new[0].device)[None]
        span = Span(rows, rows, cu_seqlens=self.cu_seqlens)
        if spec.kind is CacheKind.KV:
            return Context([span], k=new[0].transpose(0, 1), v=new[1].transpose(0, 1))
        if spec.kind is CacheKind.COMPRESSED:  # a row per token; each sequence's span names its completed blocks
            first, cu = spec.block_len - 1, self.cu_seqlens.tolist()
            spans = [Span(rows[:, a:b], rows[:, a + first:b:spec.stride]) for a, b in zip(cu, cu[1:]) if b > a]
            return Context(spans, rows=new[0])
        return Context([span], rows=new[0])

    def recurrent_states(self, layer_idx: int, spec: RecurrentState, like: torch.Tensor
                         ) -> tuple[torch.Tensor, None]:
        return like.new_zeros(self.cu_seqlens.numel() - 1, spec.conv_dim, spec.conv_width - 1), None

    def store_recurrent_states(self, layer_idx: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        pass


@dataclass
class Batch:
    positions: torch.Tensor       # [N] int64: absolute position of each new token
    cu_seqlens: torch.Tensor      # [B+1] int32: new tokens of sequence i are rows cu[i]:cu[i+1]
    cache: KVCache | None = None  # None: one full pass (NoCache)
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

    @property
    def kv(self) -> KVCache:
        """The handle the layers' calls go to."""
        return self.cache if self.cache is not None else NoCache(self.cu_seqlens)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               window_size: tuple[int, int] = (-1, -1), scale: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        return self.kv.attend(layer_idx, q, k, v, self, window_size=window_size, scale=scale, sinks=sinks)

    def store(self, layer_idx: int, spec: CacheSpec, *new: torch.Tensor) -> Context:
        return self.kv.store(layer_idx, spec, *new)

    def recurrent_states(self, layer_idx: int, spec: RecurrentState, like: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.kv.recurrent_states(layer_idx, spec, like)

    def store_recurrent_states(self, layer_idx: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        self.kv.store_recurrent_states(layer_idx, conv, state)


@dataclass
class ContiguousKVCache:
    """One [B, max_len, ...] buffer per layer and spec for B sequences that advance in lock step.

    The reference generation path (and the engine's oracle); the engine's paged cache replaces it
    for serving. `length` is the number of tokens already stored; the model advances it after a step.
    """
    batch_size: int
    max_len: int
    length: int = 0
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: dict[tuple[int, CacheKind], torch.Tensor] = field(default_factory=dict)
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

    def _new_tokens(self, new: torch.Tensor) -> int:
        n = new.shape[0] // self.batch_size
        if self.length + n > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length} stored + {n} new do not fit")
        return n

    def _put(self, buffers: dict, key: object, new: torch.Tensor) -> torch.Tensor:
        """Write new [B*n, ...] at positions length..length+n of buffer key [B, max_len, ...]."""
        B, n = self.batch_size, self._new_tokens(new)
        if key not in buffers:
            buffers[key] = new.new_empty(B, self.max_len, *new.shape[1:])
        buffers[key][:, self.length:self.length + n] = new.view(B, n, *new.shape[1:])
        return buffers[key]

    def append_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B*n, Hkv, d] of the new tokens; return the layer's K and V so far [B, length + n, Hkv, d]."""
        end = self.length + self._new_tokens(k)
        return (self._put(self.keys, layer_idx, k)[:, :end], self._put(self.values, layer_idx, v)[:, :end])

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, *,
               window_size: tuple[int, int], scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        B = self.batch_size
        n = q.shape[0] // B
        kc, vc = self.append_kv(layer_idx, k, v)
        out = attention(q.view(B, n, *q.shape[1:]), kc, vc, causal=True, window_size=window_size, scale=scale,
                        sinks=sinks)
        return out.reshape(B * n, *out.shape[2:])

    def store(self, layer_idx: int, spec: CacheSpec, *new: torch.Tensor) -> Context:
        if spec.kind is CacheKind.UNSERVED:
            raise NotImplementedError(spec.message)
        B, M = self.batch_size, self.max_len
        n = self._new_tokens(new[0])
        dev = new[0].device
        # sequence b's tokens are rows b*max_len + position of the flattened buffers
        span = Span(torch.arange(B * n, device=dev).view(B, n),
                    torch.arange(B, device=dev)[:, None] * M + torch.arange(self.length + n, device=dev))
        if spec.kind is CacheKind.KV:
            k, v = (self._put(bufs, layer_idx, t) for bufs, t in ((self.keys, new[0]), (self.values, new[1])))
            return Context([span], k=k.flatten(0, 1).transpose(0, 1), v=v.flatten(0, 1).transpose(0, 1))
        rows = self._put(self.rows, (layer_idx, spec.kind), new[0]).flatten(0, 1)
        if spec.kind is CacheKind.COMPRESSED:  # a row per token here; the span names the completed blocks'
            span = Span(span.rows, span.keys[:, spec.block_len - 1::spec.stride])
        return Context([span], rows=rows)
