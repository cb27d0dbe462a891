"""Request bodies of the OpenAI surface (plus vLLM's top-level sampling extensions).

Types are strict (no "5" for 5, no true for 1, no NaN or infinity): a wrong type is the client's bug, and
guessing hides it. Bounds that depend on the server's configuration are in limits.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# torch seeds are 64-bit: anything wider would overflow in the engine
Seed = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI and vLLM do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _is_ids(v: object) -> bool:
    return isinstance(v, list) and all(type(t) is int for t in v)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by completions and chat; None means "not given"."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: Any = None                    # str | list[str] | None, checked below
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    structured_outputs: dict[str, Any] | None = None   # vLLM's: exactly one of json, regex, choice, grammar, json_object
    # accepted for compatibility but only their neutral values are supported
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> str | list[str] | None:
        if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            return v
        raise ValueError("must be a string or a list of strings")


class CompletionRequest(SamplingFields):
    prompt: Any                         # str | list[int] | list[str] | list[list[int]], checked below
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int] | list[str] | list[list[int]]:
        if isinstance(v, str) or _is_ids(v) or (isinstance(v, list) and (all(isinstance(p, str) for p in v)
                                                                        or all(_is_ids(p) for p in v))):
            return v
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")


class FunctionCall(_Body):
    name: str
    arguments: str                      # JSON text, as OpenAI sends it back


class ToolCallMessage(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Any = None                 # str | list[dict] | None, checked below
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None     # an assistant's earlier calls
    tool_call_id: str | None = None                     # a tool result: the call it answers
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str | list[dict[str, Any]] | None:
        if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, dict) for p in v)):
            return v
        raise ValueError("must be a string, a list of content parts or null")


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None     # a JSON schema; none: no arguments
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None             # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
