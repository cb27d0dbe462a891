"""attnzoo: the open history of Transformer attention, correct, fast, trainable and servable."""

from attnzoo.models import ModelLoadError, load_model

__version__ = "0.1.0"
__all__ = ["ModelLoadError", "load_model"]
