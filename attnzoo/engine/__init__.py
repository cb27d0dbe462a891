"""The serving engine (paged KV, radix prefix cache, continuous batching) and the simple reference
generator it is tested against."""

from attnzoo.engine.llm import LLM
from attnzoo.engine.outputs import CompletionOutput, RequestOutput
from attnzoo.engine.tp import EngineDeadError
from attnzoo.engine.sampling import SamplingParams
from attnzoo.engine.simple import GenerationConfig, generate, stream_generate

__all__ = ["LLM", "CompletionOutput", "EngineDeadError", "GenerationConfig", "RequestOutput", "SamplingParams", "generate",
           "stream_generate"]
