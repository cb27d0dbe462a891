"""OpenAI request fields -> the engine's SamplingParams, with OpenAI's errors for what cannot run."""

from __future__ import annotations

from attnzoo.engine.sampling import SamplingParams
from attnzoo.engine.structured import StructuredOutputsParams
from attnzoo.server.errors import APIError, from_value_error, num
from attnzoo.server.protocol import SamplingFields

DEFAULT_MAX_TOKENS_CAP = 4096


def context_error(max_model_len: int, prompt_len: int, max_tokens: int | None, where: str) -> APIError:
    asked = prompt_len + (max_tokens or 0)
    return APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                         f"{num(asked)} tokens ({prompt_len} in the {where}, {num(max_tokens or 0)} in the completion). "
                         f"Please reduce the length of the {where} or completion.",
                    param=where, code="context_length_exceeded")


def build_params(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None, prompt_len: int,
                 max_model_len: int, kv_tokens: int, vocab_size: int, where: str,
                 default_max_tokens: int | None = None,
                 structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """`max_tokens=None` means "not given": `default_max_tokens`, else what the context and cache leave."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if prompt_len == 0:
        raise APIError(400, f"the {where} is empty", param=where)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {num(max_tokens)}", param="max_tokens")
    room = min(max_model_len, kv_tokens) - prompt_len
    if prompt_len >= max_model_len or (max_tokens is not None and prompt_len + max_tokens > max_model_len):
        raise context_error(max_model_len, prompt_len, max_tokens, where)
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens or DEFAULT_MAX_TOKENS_CAP, room))
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            # a top-k that keeps the whole vocabulary is no top-k (and a huge one would overflow int64)
            top_k=0 if req.top_k is None or req.top_k >= vocab_size else req.top_k,
            min_p=req.min_p or 0.0, seed=req.seed, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logprobs=logprobs, n=req.n, structured_outputs=structured_outputs)
        params.validate(vocab_size=vocab_size, max_model_len=max_model_len, prompt_len=prompt_len)
    except ValueError as e:
        raise from_value_error(e) from None
    return params
