"""GGUF checkpoints through the `gguf` package: metadata -> ModelConfig, tensors dequantised to float,
llama.cpp's Q/K row permutation undone, tokenizer and chat template from the metadata; `quantize_gguf` then
puts the file's own Q4_0/Q4_1/Q8_0 blocks, exactly as shipped, under the model's linears (the C++ kernel)."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from torch import nn
from tqdm import tqdm

from attnzoo.errors import ModelLoadError
from attnzoo.layers.quant import QuantLinear, quantize_model
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.tokenizer import Tokenizer
from attnzoo.models.weights import build_model
from attnzoo.ops.quant import GGUF_TYPES, Blocks, cat_rows, pack, q_kind, unpack_gguf

GGUF_ARCHITECTURES = ("llama", "qwen3")
# The types we promise (tested); others that gguf can dequantise load too.
TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    return None


def unpermute_qk(w: np.ndarray | torch.Tensor, n_heads: int) -> np.ndarray | torch.Tensor:
    """Inverse of llama.cpp's convert-time permutation, which reorders each head's rows from RoPE's
    half-split pairing (i, i + d/2) to interleaved pairs (2i, 2i+1)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Reader(GGUFReader):
    """GGUFReader slicing a plain ndarray view of its memory map: numpy runs a Python hook on every slice of
    an np.memmap, and the reader slices each of the ~100k tokenizer strings several times (3x faster)."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._plain = mapped.view(np.ndarray)  # shares the mapping, which its .base keeps open


def read_fields(reader: GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def open_gguf(path: Path) -> tuple[GGUFReader, dict[str, Any]]:
    """The file's reader and metadata, parsed once per process while the file is unchanged: parsing a
    49k-token vocabulary takes seconds, and a process often loads one model several times (a quantised and a
    float copy, a notebook re-running its cell)."""
    st = Path(path).stat()
    reader, fields = _open(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    return reader, dict(fields)


@lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int) -> tuple[GGUFReader, dict[str, Any]]:
    reader = _Reader(path)
    return reader, read_fields(reader)


def config_from_gguf(f: dict[str, Any]) -> ModelConfig:
    arch = f.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        return f.get(f"{arch}.{key}", default)

    heads, hidden = get("attention.head_count"), get("embedding_length")
    if heads is None or hidden is None:
        raise ModelLoadError("the GGUF metadata lacks attention.head_count or embedding_length")
    head_dim = get("attention.key_length") or hidden // heads
    scaling = None
    kind = get("rope.scaling.type")
    if kind and kind != "none":
        scaling = {"rope_type": kind, "factor": get("rope.scaling.factor"),
                   "original_max_position_embeddings": get("rope.scaling.original_context_length")}
    tokens = f.get("tokenizer.ggml.tokens")
    eos = f.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch, vocab_size=get("vocab_size") or len(tokens or []), hidden_size=hidden,
        intermediate_size=get("feed_forward_length"), num_layers=get("block_count"), num_heads=heads,
        num_kv_heads=get("attention.head_count_kv") or heads, head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6), rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=scaling, partial_rotary_factor=(get("rope.dimension_count") or head_dim) / head_dim,
        max_position_embeddings=get("context_length", 2048), qk_norm=arch == "qwen3",
        sliding_window=get("attention.sliding_window"),
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"), eos_token_ids=[] if eos is None else [eos],
        name=f.get("general.name", ""))


def linear_weight_type(path: Path) -> str | None:
    """The storage type most of the file's per-layer matrices use (e.g. "Q4_1"), or None if it has none."""
    try:
        reader, _ = open_gguf(path)
    except Exception:  # noqa: BLE001 - unreadable files are reported by load_gguf
        return None
    kinds = Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else None


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> DecoderLM:
    try:
        reader, fields = open_gguf(path)
    except Exception as e:  # gguf raises ValueError/KeyError/IndexError on truncated or corrupt files
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    cfg = config_from_gguf(fields)
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ModelLoadError("this GGUF uses per-frequency RoPE factors (rope_freqs.weight), not supported yet")
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor"):
        name = hf_name(t.name)
        if name is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(f"tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantised; "
                                 f"supported: {', '.join(TESTED_TYPES)} and most llama.cpp block types") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if cfg.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_qk(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        if not w.flags.writeable:  # a view of the read-only file map (F32 tensors): torch needs its own copy
            w = w.copy()
        # converted before the next tensor is dequantised, so the load peaks near the model's own size, not
        # at twice its float32 size (each value is rounded once, as converting them all at the end would)
        tensors[name] = torch.from_numpy(w).to(dtype)
    cfg.tie_word_embeddings = "lm_head.weight" not in tensors
    model = build_model(cfg, tensors, dtype)
    try:
        model.tokenizer = Tokenizer.from_gguf_fields(fields, cfg)
    except ModelLoadError:
        model.tokenizer = None  # the model still runs on token ids; text features say why they cannot
    return model


# Our fused linears as row concatenations of the checkpoint's matrices (the mechanisms' hf_weights fuse them so
# for the GGUF architectures; quantize_gguf checks each result against the float weight the model was built from)
_PARTS = {"attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "mlp.down_proj": ("mlp.down_proj",)}


def _parts(module: str, cfg: ModelConfig) -> list[str] | None:
    if module == "lm_head":
        return ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    layer, _, rest = module.removeprefix("layers.").partition(".")
    return [f"model.layers.{layer}.{p}.weight" for p in _PARTS[rest]] if rest in _PARTS else None


def _blocks(t: Any, name: str, cfg: ModelConfig) -> Blocks:
    b = unpack_gguf(t.data, t.tensor_type, (int(t.shape[1]), int(t.shape[0])))
    if cfg.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
        b = b.map_rows(lambda a: unpermute_qk(a, heads))
    return b


def quantize_gguf(model: DecoderLM, path: Path) -> dict[str, str]:
    """Swap the linears of a model load_gguf built from `path` for QuantLinears on the file's own Q4_0, Q4_1
    and Q8_0 blocks, exactly as shipped (for the C++ kernel, ops/quant_kernels.py). A linear the file stores
    otherwise (float, K-quants, fused parts of mixed types) is quantised from its float weight to q4_1, the
    lm_head to q8_0. Returns {name: kind}."""
    reader, _ = open_gguf(path)
    tensors = {hf_name(t.name): t for t in reader.tensors if t.tensor_type in GGUF_TYPES and len(t.shape) == 2}
    done: dict[str, str] = {}
    for name, lin in list(model.named_modules()):
        parts = _parts(name, model.config) if isinstance(lin, nn.Linear) else None
        if not parts or any(p not in tensors for p in parts):
            continue
        blocks = [_blocks(tensors[p], p, model.config) for p in parts]
        if len({b.bits for b in blocks}) > 1:
            continue
        fused = cat_rows(blocks)
        rows = torch.arange(0, fused.shape[0], 7)  # a sample: any other row order or fusion shows in it
        if not torch.equal(fused.rows(rows).dequantize().to(lin.weight.dtype), lin.weight.detach()[rows]):
            raise ModelLoadError(f"{name}: the file's blocks {parts} do not make up the loaded weight")
        qw = pack(fused, q_kind(fused))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(qw, lin.bias))
        done[name] = qw.kind
    return done | quantize_model(model, "q4_1")
