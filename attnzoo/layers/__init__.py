"""nn.Modules around the ops: projections, norms, rope, attention; each attention layer declares its cache spec."""

from attnzoo.layers.attention import Attention
from attnzoo.layers.batch import Batch, Context, ContiguousKVCache, KVCache, NoCache, Span
from attnzoo.layers.cache_spec import (CacheKind, CacheSpec, FullKV, IndexerKeys, LatentKV, RecurrentState, SlidingKV,
                                       Unserved)
from attnzoo.layers.mla import MLAttention
from attnzoo.layers.mlp import SwiGLU
from attnzoo.layers.moe import DeepseekMoE
from attnzoo.layers.norm import RMSNorm
from attnzoo.layers.rope import RotaryEmbedding

__all__ = ["Attention", "Batch", "CacheKind", "CacheSpec", "Context", "ContiguousKVCache", "DeepseekMoE", "FullKV",
           "IndexerKeys", "KVCache", "LatentKV", "MLAttention", "NoCache", "RecurrentState", "RMSNorm", "RotaryEmbedding",
           "SlidingKV", "Span", "SwiGLU", "Unserved"]
