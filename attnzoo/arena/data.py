"""The arena's data, all offline and deterministic.

Vocabulary (one id space for every task):
    0..255      bytes (the LM corpus is tokenised at the byte level: no tokenizer to download)
    256..259    <|endoftext|> (between files; the end of a chat turn), <|im_start|>, <|im_end|>, <|pad|>
    260..387    MQAR keys       (disjoint from the bytes, so recall can never be solved from text statistics)
    388..515    MQAR values

* LM corpus: the CPython standard library's `.py` sources (under `sysconfig.get_paths()["stdlib"]`, without
  site-packages), read in sorted path order; a file goes to validation when the SHA-1 of its relative path
  falls in the first `val_percent` of the hash space (a split by file, stable across machines and Python
  versions for the files they share). Training windows are drawn from a generator seeded with (seed, step),
  so the data order is a function of the seed alone: identical for every mechanism and after a resume.
* MQAR (multi-query associative recall, Zoology, arXiv 2312.04927): `num_kv_pairs` key-value pairs, then every
  key asked once at a random even offset of the rest of the sequence, its value written right after it.
  The loss and the accuracy count only the query positions (label = the value); the other positions carry
  random values as noise.
* Needle probe: a key-value pair hidden at a given depth of held-out corpus text that is longer than the
  training length, the key asked at the very end; the model must produce the value.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB = 256
EOT, IM_START, IM_END, PAD = 256, 257, 258, 259
SPECIAL_TOKENS = {"<|endoftext|>": EOT, "<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|pad|>": PAD}
MQAR_KEYS = 128
MQAR_VALUES = 128
KEY_BASE = 260
VALUE_BASE = KEY_BASE + MQAR_KEYS
VOCAB_SIZE = VALUE_BASE + MQAR_VALUES  # 516
IGNORE = -100


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[Path]:
    """Every `.py` under root except installed packages and caches, sorted by relative path."""
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted((p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts) and p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def is_validation(rel: str, val_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:4], "big")
    return h < val_percent / 100 * 2 ** 32


@dataclass
class Corpus:
    train: np.ndarray       # uint16 token ids: files joined by EOT
    val: np.ndarray
    files: int
    val_files: int
    fingerprint: str        # SHA-1 of the train and validation streams: which corpus a result came from

    def describe(self) -> str:
        return (f"{self.files} files, {len(self.train) / 1e6:.1f}M train / {len(self.val) / 1e3:.0f}k validation "
                f"bytes, sha1 {self.fingerprint[:12]}")


def load_corpus(root: Path | None = None, val_percent: float = 2.0, max_bytes: int | None = None) -> Corpus:
    """The byte-level corpus under root (default: this Python's standard library). max_bytes caps the
    stream read (tests); files are taken in sorted order until it is reached."""
    root = Path(root) if root is not None else stdlib_root()
    files = corpus_files(root)
    if not files:
        raise ValueError(f"no .py files under {root}: the arena's corpus is empty")
    train, val, total, nval = [], [], 0, 0
    for p in files:
        rel = p.relative_to(root).as_posix()
        try:
            data = p.read_bytes()
        except OSError:
            continue
        to_val = is_validation(rel, val_percent)
        nval += to_val
        (val if to_val else train).append(np.frombuffer(data, dtype=np.uint8).astype(np.uint16))
        (val if to_val else train).append(np.array([EOT], dtype=np.uint16))
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not val or not train:
        raise ValueError(f"the corpus under {root} is too small to split into train and validation")
    tr, va = np.concatenate(train), np.concatenate(val)
    h = hashlib.sha1(tr.tobytes())
    h.update(va.tobytes())
    return Corpus(tr, va, files=len(train) // 2 + len(val) // 2, val_files=nval, fingerprint=h.hexdigest())


def rng(seed: int, *stream: int) -> np.random.Generator:
    """A generator for one purpose (stream ids) of one seed: draws never depend on what ran before."""
    return np.random.default_rng([seed, *stream])


def lm_batch(tokens: np.ndarray, batch: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """[batch, seq_len + 1] random windows of the stream, a function of (seed, step) only."""
    if len(tokens) < seq_len + 2:
        raise ValueError(f"the token stream ({len(tokens)}) is shorter than one window of {seq_len + 1}")
    starts = rng(seed, 1, step).integers(0, len(tokens) - seq_len - 1, size=batch)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def val_windows(tokens: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """[n, seq_len + 1] evenly spaced windows of the validation stream (fixed: the same for every run)."""
    n = max(1, min(count, (len(tokens) - 1) // (seq_len + 1)))
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


# ------------------------------------------------------------------------------------------------- MQAR

def mqar(num_examples: int, seq_len: int, num_kv_pairs: int, generator: np.random.Generator, *,
         vocab: int = MQAR_KEYS, noise: str = "values", with_replacement: bool = False,
         bases: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall. Returns (inputs [N, T], labels [N, T]); labels are IGNORE except at
    the query positions, where they hold the value the model must predict next.

    Layout: k1 v1 k2 v2 ... kD vD | the rest: D queries (each key once, in random order) at random even
    offsets, each followed by its value; the other positions hold random value tokens (noise="values") or
    <|pad|> (noise="pad": the recall track's easier, scaled-down setting). Keys and values are drawn from the
    first `vocab` ids of their ranges. with_replacement: each query asks a random key (repeats allowed) instead
    of every key once, which closes a shortcut: asking every key once lets a model answer the last query by
    elimination (with 2 pairs, 0.75 accuracy without any recall). bases: (first key id, first value id, pad
    id) of a vocabulary of the caller's (the recall track's: any size); None: the byte vocabulary's ranges."""
    T, D = seq_len, num_kv_pairs
    key_base, value_base, pad = bases or (KEY_BASE, VALUE_BASE, PAD)
    cap = min(MQAR_KEYS, MQAR_VALUES) if bases is None else value_base - key_base
    if T % 2 or D < 1 or 4 * D > T:
        raise ValueError(f"MQAR needs an even seq_len >= 4 * num_kv_pairs >= 4; got seq_len {T}, pairs {D}")
    if not 1 <= vocab <= cap or D > vocab:
        raise ValueError(f"MQAR draws from {vocab} keys (at most {cap}); {D} pairs do not fit")
    if noise not in ("values", "pad"):
        raise ValueError(f"MQAR noise must be 'values' or 'pad', got {noise!r}")
    g = generator
    keys = np.argsort(g.random((num_examples, vocab)), axis=1)[:, :D] + key_base
    values = np.argsort(g.random((num_examples, vocab)), axis=1)[:, :D] + value_base
    x = g.integers(value_base, value_base + vocab, size=(num_examples, T))
    if noise == "pad":
        x[:] = pad
    y = np.full((num_examples, T), IGNORE, dtype=np.int64)
    x[:, 0:2 * D:2], x[:, 1:2 * D:2] = keys, values
    slots = (T - 2 * D) // 2                                        # query slots: even offsets after the pairs
    pick = np.argsort(g.random((num_examples, slots)), axis=1)[:, :D]     # D distinct slots per example
    order = (g.integers(0, D, size=(num_examples, D)) if with_replacement     # which pair each slot asks
             else np.argsort(g.random((num_examples, D)), axis=1))
    pos = 2 * D + 2 * pick
    rows = np.arange(num_examples)[:, None]
    x[rows, pos] = np.take_along_axis(keys, order, 1)
    x[rows, pos + 1] = np.take_along_axis(values, order, 1)
    y[rows, pos] = np.take_along_axis(values, order, 1)
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y)


def needle_recall(num_examples: int, seq_len: int, generator: np.random.Generator, *, vocab: int,
                  bases: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """S-NIAH-style single needle (RULER's simplest retrieval task, on MQAR's tokens): one key-value pair at a
    uniformly random depth of a <|pad|> haystack and its key as the last token but one, labelled with the value
    (MQAR's convention: the label sits at the query). Same (inputs, labels) layout as mqar()."""
    if seq_len < 4 or seq_len % 2:
        raise ValueError(f"the needle needs an even seq_len >= 4, got {seq_len}")
    key_base, value_base, pad = bases
    g, n, T = generator, num_examples, seq_len
    key = g.integers(key_base, key_base + vocab, size=n)
    value = g.integers(value_base, value_base + vocab, size=n)
    at = 2 * g.integers(0, (T - 2) // 2, size=n)           # even offsets before the query
    x = np.full((n, T), pad, dtype=np.int64)
    y = np.full((n, T), IGNORE, dtype=np.int64)
    rows = np.arange(n)
    x[rows, at], x[rows, at + 1] = key, value
    x[:, T - 2], x[:, T - 1], y[:, T - 2] = key, value, value
    return torch.from_numpy(x), torch.from_numpy(y)


def parse_mqar(inputs: list[int], num_kv_pairs: int) -> dict[int, int]:
    """Read an MQAR sequence back: {query position: the value its key was bound to} (for tests and sanity)."""
    D = num_kv_pairs
    table = {inputs[2 * i]: inputs[2 * i + 1] for i in range(D)}
    return {p: table[t] for p, t in enumerate(inputs) if p >= 2 * D and KEY_BASE <= t < VALUE_BASE}


def mqar_eval_sets(lengths: tuple[int, ...], examples: int, seed: int, per: int = 16
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed test sets, one per length, with kv_pairs(length, per) pairs; seed stream 3 is never used for
    training."""
    return {T: mqar(examples, T, kv_pairs(T, per), rng(seed, 3, T)) for T in lengths}


def kv_pairs(seq_len: int, per: int = 16) -> int:
    """Key-value pairs in an MQAR sequence: one per `per` tokens (Zoology's scaling with length), 2..128."""
    return max(2, min(MQAR_KEYS, seq_len // per))


# ------------------------------------------------------------------------------------------------ needle

@dataclass
class NeedleSet:
    context: int
    inputs: torch.Tensor   # [N, context]
    answers: torch.Tensor  # [N] the value token expected after the last position
    depths: list[float]    # where the needle sits, as a fraction of the context


def needle_probe(haystack: np.ndarray, context: int, depth: float, key: int, value: int) -> torch.Tensor:
    """`context` tokens: corpus text with [key, value] at `depth` of it, and the key again as the last token."""
    if context < 8 or not 0 <= depth <= 1:
        raise ValueError(f"needle needs context >= 8 and depth in [0, 1]; got {context}, {depth}")
    if len(haystack) < context:
        raise ValueError(f"the haystack ({len(haystack)} tokens) is shorter than the context {context}")
    text = haystack[:context - 3].astype(np.int64)
    at = int(round(depth * (context - 3)))
    seq = np.concatenate([text[:at], [key, value], text[at:], [key]])
    return torch.from_numpy(seq)


def needle_sets(tokens: np.ndarray, contexts: tuple[int, ...], depths: tuple[float, ...], per_depth: int,
                seed: int) -> list[NeedleSet]:
    """For each context, per_depth probes at each depth, each on its own stretch of held-out text with its own
    random key and value (seed stream 4)."""
    out = []
    for c in contexts:
        g = rng(seed, 4, c)
        xs, ans, ds = [], [], []
        for d in depths:
            for _ in range(per_depth):
                start = int(g.integers(0, max(1, len(tokens) - c)))
                hay = tokens[start:start + c]
                if len(hay) < c:  # a short validation stream: wrap around
                    hay = np.resize(tokens, c)
                key = int(g.integers(KEY_BASE, VALUE_BASE))
                value = int(g.integers(VALUE_BASE, VOCAB_SIZE))
                xs.append(needle_probe(hay, c, d, key, value))
                ans.append(value)
                ds.append(d)
        out.append(NeedleSet(c, torch.stack(xs), torch.tensor(ans), ds))
    return out
