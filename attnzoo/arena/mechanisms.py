"""The arena's contestants: each mechanism family declares its own (attnzoo/mechanisms/: a name, the
ModelConfig fields it sets on one shared `Shape`, a description); `MECHANISMS` and `DESCRIPTIONS` are views
of the registry, so every contestant has the same width, depth, MLP, vocabulary and context and only the
attention layers differ.

Heads: every softmax-family mechanism keeps `heads` query heads of `head_dim`; MHA has as many KV heads,
GQA (and SWA, MSA, NSA, which run on GQA) `heads // 4` (at least 2 and at most heads), MQA one. MLA, GDN and
KDA are sized so a layer's attention parameters stay within ~±30 % of MHA's; `parameters()` reports the
exact counts. Sparse sizes scale with the training length so sparsity bites at it (seq 256: window 64,
DSA top-64 tokens, MSA 4 blocks of 16, NSA 4 blocks of 16 + window 64).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from attnzoo.mechanisms import contestants
from attnzoo.mechanisms.common import hybrid_pattern
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


def config_for(name: str, shape: Shape) -> ModelConfig:
    """Contestant `name`'s model: the shared shape (MHA's heads unless the contestant says otherwise) plus
    the fields its family declares for it."""
    fields: dict[str, Any] = dict(
        architecture="attnzoo", vocab_size=shape.vocab_size, hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_layers=shape.layers, num_heads=shape.heads,
        num_kv_heads=shape.heads, head_dim=shape.head_dim, max_position_embeddings=shape.max_positions,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, name=f"arena-{name}")
    return ModelConfig.compose(**{**fields, **contestants()[name].fields(shape)})


class _Contestants(Mapping):
    """A view of the registered families' contestants, read at each use (a family registered later is in it)."""

    def __init__(self, value: Callable[[str], Any]):
        self.value = value

    def __getitem__(self, name: str) -> Any:
        if name not in contestants():
            raise KeyError(name)
        return self.value(name)

    def __iter__(self) -> Iterator[str]:
        return iter(contestants())

    def __len__(self) -> int:
        return len(contestants())


# name -> its config function, in registration order; and what the report says each one is
MECHANISMS: Mapping[str, Callable[[Shape], ModelConfig]] = _Contestants(lambda name: partial(config_for, name))
DESCRIPTIONS: Mapping[str, str] = _Contestants(lambda name: contestants()[name].description)


def __getattr__(name: str) -> Callable[[Shape], ModelConfig]:
    """A contestant's config function as a module attribute: `mechanisms.gqa(shape)`."""
    if name in contestants():
        return MECHANISMS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def depth_for(names: list[str], layers: int) -> None:
    """Raise a clear error before any training when a hybrid's pattern does not tile the depth."""
    for n in names:
        for ratio in ((3,) if n.endswith("3_1") else (5,) if n.endswith("5_1") else ()):
            if layers % (ratio + 1):
                raise ValueError(f"{n} needs a depth that is a multiple of {ratio + 1}; got --layers {layers}")


__all__ = ["DESCRIPTIONS", "MECHANISMS", "Shape", "config_for", "depth_for", "hybrid_pattern", "parse_mechanisms"]
