"""Generation. `simple` is the single-batch contiguous-cache path; the paged engine builds on the same model."""

from attnzoo.engine.simple import GenerationConfig, generate, stream_generate

__all__ = ["GenerationConfig", "generate", "stream_generate"]
