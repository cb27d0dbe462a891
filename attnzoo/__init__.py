"""attnzoo: the open history of Transformer attention, correct, fast, trainable and servable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "ModelLoadError", "SamplingParams", "load_model"]

if TYPE_CHECKING:
    from attnzoo.engine import LLM, SamplingParams
    from attnzoo.models import ModelLoadError, load_model

_LAZY = {"LLM": "attnzoo.engine", "SamplingParams": "attnzoo.engine", "ModelLoadError": "attnzoo.models",
         "load_model": "attnzoo.models"}


def __getattr__(name: str) -> Any:
    # lazy, so `import attnzoo.ops` stays light (no tokenizer, gguf or engine imports for a kernel user)
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnzoo' has no attribute {name!r}")
