"""attnzoo's own checkpoint format (what the arena writes): a directory with

    config.json         {"model_type": "attnzoo", ...every ModelConfig field...} (a plug-in family's config
                        under "plugins": its family must be registered to load it)
    model.safetensors   DecoderLM's own state-dict names (no transformers renaming)
    tokenizer.json      optional, plus tokenizer_config.json (chat template, eos token)

`save_native` writes it, `load_native` reads it back (`load_model(dir)` dispatches here on the model_type).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from attnzoo.errors import ModelLoadError
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.weights import model_class

MODEL_TYPE = "attnzoo"


def config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    return {"model_type": MODEL_TYPE, **dataclasses.asdict(cfg)}


def config_from_json(raw: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    if "linear" in fields:  # written before the delta-rule family had one name: its config was "linear"
        fields.setdefault("delta_rule", fields.pop("linear"))
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ModelLoadError(f"config.json has fields this attnzoo does not know: {', '.join(unknown)} "
                             f"(written by a newer version?)")
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json does not describe a valid attnzoo model: {e}") from None


def save_native(model: DecoderLM, path: str | Path, tokenizer_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ the given tokenizer files: name -> text) into path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_json(model.config), indent=1) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; restored on load
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt", "model_type": MODEL_TYPE})
    for name, text in (tokenizer_files or {}).items():
        (path / name).write_text(text)
    return path


def load_native(path: str | Path, dtype: torch.dtype = torch.float32, raw: dict[str, Any] | None = None) -> DecoderLM:
    path = Path(path)
    if raw is None:
        raw = json.loads((path / "config.json").read_text())
    cfg = config_from_json(raw)
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises several error types for missing/corrupt files
        raise ModelLoadError(f"{path / 'model.safetensors'} could not be read as safetensors: {e}") from None
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
    model = model_class(cfg)(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(dtype).eval()
    from attnzoo.models.tokenizer import Tokenizer
    model.tokenizer = Tokenizer.from_hf_dir(path, cfg)
    return model
