"""The arena's contestants: one function per mechanism, each returning a `ModelConfig` built from one shared
`Shape` (same width, depth, MLP, vocabulary and context), so only the attention layers differ.

Heads: every softmax-family mechanism keeps `heads` query heads of `head_dim`; MHA has as many KV heads,
GQA (and SWA, MSA, NSA, which run on GQA) `heads // 4` (at least 2 and at most heads), MQA one. MLA, GDN and
KDA are sized so a layer's attention parameters stay within ~±30 % of MHA's; `parameters()` reports the
exact counts. Sparse sizes scale with the training length so sparsity bites at it (seq 256: window 64,
DSA top-64 tokens, MSA 4 blocks of 16, NSA 4 blocks of 16 + window 64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnzoo.mechanisms import delta, dsa as dsa_, latent, msa as msa_, nsa as nsa_
from attnzoo.models.config import ModelConfig


@dataclass(frozen=True)
class Shape:
    """What every contestant shares."""
    vocab_size: int
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    intermediate: int = 384            # SwiGLU width (3 matrices), the same in every layer
    seq_len: int = 256                 # the training length; sparse sizes scale from it
    max_positions: int = 8192          # RoPE table length: the needle probe and decode go past seq_len

    @property
    def kv_heads(self) -> int:         # GQA's KV heads
        return min(self.heads, max(2, self.heads // 4))

    @property
    def window(self) -> int:           # SWA and NSA's window branch
        return max(16, self.seq_len // 4)

    @property
    def block(self) -> int:            # MSA blocks and NSA selection blocks
        return max(4, self.seq_len // 16)


def _base(s: Shape, name: str, **kw: Any) -> ModelConfig:
    fields = dict(architecture="attnzoo", vocab_size=s.vocab_size, hidden_size=s.hidden,
                  intermediate_size=s.intermediate, num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.heads,
                  head_dim=s.head_dim, max_position_embeddings=s.max_positions, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, name=f"arena-{name}")
    fields.update(kw)
    return ModelConfig(**fields)


def hybrid_pattern(layers: int, ratio: int, other: str, every: str) -> list[str]:
    """`ratio` layers of `other`, then one of `every`, repeated (3:1 on 12 layers: o o o E o o o E ...).
    The pattern must tile the depth, so a 3:1 hybrid needs a multiple of 4 layers, 5:1 of 6."""
    if layers % (ratio + 1):
        raise ValueError(f"a {ratio}:1 hybrid needs a depth that is a multiple of {ratio + 1}; got {layers} layers")
    return [every if (i + 1) % (ratio + 1) == 0 else other for i in range(layers)]


def _mla(s: Shape) -> latent.Config:
    # DeepSeek-V3's proportions at this width: latent = hidden / 2, rope slice = head_dim / 2, query rank 3/4
    return latent.Config(q_lora_rank=3 * s.hidden // 4, kv_lora_rank=s.hidden // 2, qk_nope_head_dim=s.head_dim,
                         qk_rope_head_dim=s.head_dim // 2, v_head_dim=s.head_dim, rope_interleave=True)


def _mla_fields(s: Shape) -> dict[str, Any]:
    m = _mla(s)
    return dict(attention_type="mla", mla=m, head_dim=m.qk_rope_head_dim)


def _gdn(s: Shape) -> delta.Config:
    # Qwen3-Next's layout: twice as many value heads as key heads
    return delta.Config(kind="gdn", num_k_heads=max(1, s.heads // 2), num_v_heads=s.heads, k_dim=s.head_dim,
                        v_dim=s.head_dim, conv_width=4)


def _kda(s: Shape) -> delta.Config:
    return delta.Config(kind="kda", num_k_heads=s.heads, num_v_heads=s.heads, k_dim=s.head_dim, v_dim=s.head_dim,
                        conv_width=4)


# ----------------------------------------------------------------------------------------- contestants

def mha(s: Shape) -> ModelConfig:
    return _base(s, "mha")


def mqa(s: Shape) -> ModelConfig:
    return _base(s, "mqa", num_kv_heads=1)


def gqa(s: Shape) -> ModelConfig:
    return _base(s, "gqa", num_kv_heads=s.kv_heads)


def swa(s: Shape) -> ModelConfig:
    return _base(s, "swa", num_kv_heads=s.kv_heads, sliding_window=s.window,
                 layer_types=["sliding_attention"] * s.layers)


def swa_hybrid_3_1(s: Shape) -> ModelConfig:
    return _base(s, "swa_hybrid_3_1", num_kv_heads=s.kv_heads, sliding_window=s.window,
                 layer_types=hybrid_pattern(s.layers, 3, "sliding_attention", "full_attention"))


def swa_hybrid_5_1(s: Shape) -> ModelConfig:
    return _base(s, "swa_hybrid_5_1", num_kv_heads=s.kv_heads, sliding_window=s.window,
                 layer_types=hybrid_pattern(s.layers, 5, "sliding_attention", "full_attention"))


def mla(s: Shape) -> ModelConfig:
    return _base(s, "mla", **_mla_fields(s))


def gdn(s: Shape) -> ModelConfig:
    return _base(s, "gdn", num_kv_heads=s.kv_heads, linear=_gdn(s), layer_types=["linear_attention"] * s.layers)


def gdn_hybrid_3_1(s: Shape) -> ModelConfig:
    """Qwen3-Next's pattern: three GDN layers, then one full (GQA) attention layer."""
    return _base(s, "gdn_hybrid_3_1", num_kv_heads=s.kv_heads, linear=_gdn(s),
                 layer_types=hybrid_pattern(s.layers, 3, "linear_attention", "full_attention"))


def kda_mla_3_1(s: Shape) -> ModelConfig:
    """Kimi Linear's pattern: three KDA layers, then one MLA layer without positional encoding (NoPE: the
    KDA layers' conv and decay carry position)."""
    return _base(s, "kda_mla_3_1", linear=_kda(s), use_rope=False, **_mla_fields(s),
                 layer_types=hybrid_pattern(s.layers, 3, "linear_attention", "full_attention"))


def nsa(s: Shape) -> ModelConfig:
    """Paper mode (separate K/V per branch, MLP compressor): compression blocks of seq_len / 16 tokens with
    half that stride, selection of 4 blocks of seq_len / 16 (block 0 and the two local blocks among them),
    a window branch of seq_len / 4."""
    b = s.block
    opts = nsa_.Config(block_len=b, stride=b // 2, select_block=b, num_selected=4, window=s.window,
                       compress_hidden=s.head_dim, gate_hidden=max(16, s.hidden // 4))
    return _base(s, "nsa", num_kv_heads=s.kv_heads, nsa=opts, layer_types=["nsa"] * s.layers)


def dsa(s: Shape) -> ModelConfig:
    """MLA + DeepSeek-V3.2's lightning indexer choosing the top seq_len / 4 tokens per query."""
    d = dsa_.Config(index_n_heads=max(1, s.heads // 2), index_head_dim=s.head_dim,
                    index_topk=max(16, s.seq_len // 4), indexer_interleaved_rope=False)
    return _base(s, "dsa", dsa=d, **_mla_fields(s))


def msa(s: Shape) -> ModelConfig:
    """MiniMax Sparse Attention on GQA: an index head per KV group picks 4 blocks of seq_len / 16 keys (the
    query's own block forced in)."""
    m = msa_.Config(index_head_dim=s.head_dim, block_size=s.block, topk_blocks=4, local_blocks=1)
    return _base(s, "msa", num_kv_heads=s.kv_heads, msa=m, layer_types=["sparse_attention"] * s.layers)


MECHANISMS: dict[str, Callable[[Shape], ModelConfig]] = {
    f.__name__: f for f in (mha, mqa, gqa, swa, swa_hybrid_3_1, swa_hybrid_5_1, mla, gdn, gdn_hybrid_3_1,
                            kda_mla_3_1, nsa, dsa, msa)}

# what the report says each one is
DESCRIPTIONS = {
    "mha": "multi-head attention", "mqa": "multi-query attention (1 KV head)", "gqa": "grouped-query attention",
    "swa": "sliding-window attention (GQA)", "swa_hybrid_3_1": "SWA:global 3:1", "swa_hybrid_5_1": "SWA:global 5:1",
    "mla": "multi-head latent attention", "gdn": "Gated DeltaNet (linear)", "gdn_hybrid_3_1": "GDN:attention 3:1",
    "kda_mla_3_1": "KDA:MLA 3:1 (NoPE MLA)", "nsa": "native sparse attention", "dsa": "DeepSeek sparse attention (MLA)",
    "msa": "MiniMax sparse attention (GQA)"}

NO_DECODE: dict[str, str] = {}  # mechanism -> why it cannot decode through the engine (every one can now)


def parse_mechanisms(spec: str) -> list[str]:
    """"all" or a comma-separated list of names -> names in registry order (duplicates dropped).
    Unknown names raise ValueError listing the allowed ones."""
    if spec.strip() == "all":
        return list(MECHANISMS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no mechanism named; allowed: all, {', '.join(MECHANISMS)}")
    bad = [n for n in names if n not in MECHANISMS]
    if bad:
        raise ValueError(f"unknown mechanism{'s' if len(bad) > 1 else ''} {', '.join(bad)}; "
                         f"allowed: all, {', '.join(MECHANISMS)}")
    return [n for n in MECHANISMS if n in names]


def config_for(name: str, shape: Shape) -> ModelConfig:
    return MECHANISMS[name](shape)


def depth_for(names: list[str], layers: int) -> None:
    """Raise a clear error before any training when a hybrid's pattern does not tile the depth."""
    for n in names:
        for ratio in ((3,) if n.endswith("3_1") else (5,) if n.endswith("5_1") else ()):
            if layers % (ratio + 1):
                raise ValueError(f"{n} needs a depth that is a multiple of {ratio + 1}; got --layers {layers}")


__all__ = ["DESCRIPTIONS", "MECHANISMS", "NO_DECODE", "Shape", "config_for", "depth_for", "hybrid_pattern",
           "parse_mechanisms"]
