"""Cache specs: what a layer needs kept per token (or per sequence). The engine groups layers by spec
and gives each group its own page table; it never looks inside a mechanism (docs/engine.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar


class CacheKind(Enum):
    """How a spec's tokens are stored: the engine sizes and lays out a group by kind alone."""
    KV = "kv"                  # K and V per KV head per token (FullKV, SlidingKV)
    LATENT = "latent"          # one MLA latent row per token, shared by all heads
    INDEX_KEYS = "index_keys"  # one indexer key row per token (DSA, MSA, IndexShare)
    ROWS = "rows"              # one row per token holding a mechanism's raw K/V sets (NSA)
    COMPRESSED = "compressed"  # one row per completed compression block (NSA), ceil(page/stride) per page
    STATE = "state"            # a fixed-size state per sequence (delta rule), nothing per token
    UNSERVED = "unserved"      # a mechanism that has no decode cache: trains, but no cache can hold it


@dataclass(frozen=True)
class CacheSpec:
    kind: ClassVar[CacheKind]

    @property
    def window(self) -> int | None:
        """How many of the latest tokens a query reads (SlidingKV sets it); None: all of them."""
        return None

    def bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes one token costs in this cache (0 for fixed-size per-sequence state)."""
        raise NotImplementedError

    def bytes_per_page(self, page_size: int, dtype_bytes: int) -> int:
        """Bytes one page of page_size tokens costs (what the engine allocates)."""
        return self.bytes_per_token(dtype_bytes) * page_size


@dataclass(frozen=True)
class FullKV(CacheSpec):
    """Softmax attention: K and V for every token."""
    kind: ClassVar[CacheKind] = CacheKind.KV
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None

    def bytes_per_token(self, dtype_bytes: int) -> int:
        return self.num_kv_heads * (self.head_dim + (self.v_head_dim or self.head_dim)) * dtype_bytes


@dataclass(frozen=True)
class SlidingKV(FullKV):
    """Sliding-window attention: K and V, but only the last `window` tokens are ever read."""
    window: int = 0


@dataclass(frozen=True)
class RowSpec(CacheSpec):
    """One row of `dim` elements per token (its kind says whose)."""
    dim: int

    def bytes_per_token(self, dtype_bytes: int) -> int:
        return self.dim * dtype_bytes


@dataclass(frozen=True)
class LatentKV(RowSpec):
    """MLA: one latent (kv_lora_rank + rope dim) per token, shared by all heads."""
    kind: ClassVar[CacheKind] = CacheKind.LATENT


@dataclass(frozen=True)
class IndexerKeys(RowSpec):
    """DSA/MSA/IndexShare: one indexer key per token."""
    kind: ClassVar[CacheKind] = CacheKind.INDEX_KEYS


@dataclass(frozen=True)
class RowKV(RowSpec):
    """NSA: the raw keys and values of every K/V set of a layer (compression, selection, window; one when
    shared), flattened into one row per token: the selection branch may read any block."""
    kind: ClassVar[CacheKind] = CacheKind.ROWS


@dataclass(frozen=True)
class CompressedKV(RowSpec):
    """NSA's compressed keys and values: one row (K and V of every KV head) per completed compression
    block, block j = tokens [j*stride, j*stride + block_len). The row lives in the page of the token that
    completes the block (j*stride + block_len - 1), at index (that token % page_size) // stride: a page of
    page_size tokens holds ceil(page_size / stride) rows, so the rows share the token page table (and the
    prefix cache) at 1/stride of the cost."""
    kind: ClassVar[CacheKind] = CacheKind.COMPRESSED
    block_len: int
    stride: int

    def rows_per_page(self, page_size: int) -> int:
        return -(-page_size // self.stride)

    def bytes_per_token(self, dtype_bytes: int) -> int:
        return self.dim * dtype_bytes // self.stride

    def bytes_per_page(self, page_size: int, dtype_bytes: int) -> int:
        return self.rows_per_page(page_size) * self.dim * dtype_bytes


@dataclass(frozen=True)
class RecurrentState(CacheSpec):
    """Delta rule (GDN/KDA): a fixed-size state per sequence, nothing per token: the causal conv's last
    `conv_width - 1` inputs [conv_dim, conv_width - 1] (model dtype) and the state matrices
    [num_heads, k_dim, v_dim] (float32: they integrate over the whole sequence)."""
    kind: ClassVar[CacheKind] = CacheKind.STATE
    conv_dim: int
    conv_width: int
    num_heads: int
    k_dim: int
    v_dim: int

    def bytes_per_token(self, dtype_bytes: int) -> int:
        return 0

    def bytes_per_sequence(self, dtype_bytes: int) -> int:
        return self.conv_dim * (self.conv_width - 1) * dtype_bytes + self.num_heads * self.k_dim * self.v_dim * 4


@dataclass(frozen=True)
class Unserved(CacheSpec):
    """A layer whose mechanism has no decode cache yet: one full pass (training, scoring) works; a cache
    refuses it, and the engine refuses the model at construction, naming the mechanism. `reason` reads
    after the mechanism's name ("NSA" + " decode ... is not implemented")."""
    mechanism: str
    reason: str
    elements_per_token: int = 0   # what a decode cache would keep per token, for cost models
    kind: ClassVar[CacheKind] = CacheKind.UNSERVED

    @property
    def message(self) -> str:
        return f"{self.mechanism} {self.reason}"

    def bytes_per_token(self, dtype_bytes: int) -> int:
        return self.elements_per_token * dtype_bytes
