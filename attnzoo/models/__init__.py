"""Decoders assembled from per-layer lists, and their loaders (GGUF, transformers safetensors)."""

from attnzoo.errors import ModelLoadError
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.registry import DEFAULT_MODEL, KNOWN_MODELS, load_model
from attnzoo.models.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "DecoderLM", "KNOWN_MODELS", "ModelConfig", "ModelLoadError",
           "Tokenizer", "load_model"]
