"""attnzoo: the open history of Transformer attention, correct, fast, trainable and servable."""

from attnzoo.engine import LLM, SamplingParams
from attnzoo.models import ModelLoadError, load_model

__version__ = "0.1.0"
__all__ = ["LLM", "ModelLoadError", "SamplingParams", "load_model"]
