"""nn.Modules around the ops: projections, norms, rope, attention; each attention layer declares its cache spec."""

from attnzoo.layers.attention import Attention
from attnzoo.layers.batch import Batch, ContiguousKVCache
from attnzoo.layers.cache_spec import CacheSpec, FullKV, IndexerKeys, LatentKV, RecurrentState, SlidingKV
from attnzoo.layers.mla import MLAttention
from attnzoo.layers.mlp import SwiGLU
from attnzoo.layers.moe import DeepseekMoE
from attnzoo.layers.norm import RMSNorm
from attnzoo.layers.rope import RotaryEmbedding

__all__ = ["Attention", "Batch", "CacheSpec", "ContiguousKVCache", "DeepseekMoE", "FullKV", "IndexerKeys", "LatentKV",
           "MLAttention", "RecurrentState", "RMSNorm", "RotaryEmbedding", "SlidingKV", "SwiGLU"]
