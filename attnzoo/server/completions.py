"""POST /v1/completions: one or several prompts, n choices each, streamed or not."""

from __future__ import annotations

import time
from contextlib import aclosing

from fastapi import Request

from attnzoo.engine.outputs import RequestOutput
from attnzoo.server.constraints import check_grammar, request_constraint
from attnzoo.server.errors import APIError, error_body
from attnzoo.server.logprobs import completion_logprobs
from attnzoo.server.outputs import collect, iterate, usage
from attnzoo.server.params import build_params
from attnzoo.server.protocol import CompletionRequest
from attnzoo.server.sse import DONE, SSEResponse, sse
from attnzoo.server.state import ServerState, new_id

DEFAULT_MAX_TOKENS = 16   # OpenAI's and vLLM's default for the legacy completions endpoint


def _count(prompt) -> int:
    return 1 if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else len(prompt)


async def _prompts(st: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await st.encode_prompt(prompt, "prompt")]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        return [st.check_token_ids(list(prompt), "prompt")]
    if isinstance(prompt[0], str):
        return [await st.encode_prompt(p, f"prompt.{i}") for i, p in enumerate(prompt)]
    return [st.check_token_ids(list(p), f"prompt.{i}") for i, p in enumerate(prompt)]


async def create_completion(body: CompletionRequest, request: Request, st: ServerState):
    st.check_model(body.model)
    st.limits.check_request(body, vocab_size=st.vocab_size, prompts=_count(body.prompt), best_of=body.best_of)
    st.limits.check_logprobs(body.logprobs, "logprobs")
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    so = request_constraint(body, st)
    if so is not None:
        await check_grammar(st, so, "structured_outputs")
    prompts = await _prompts(st, body.prompt)
    params = [build_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs, prompt_len=len(p),
                           max_model_len=st.max_model_len, kv_tokens=st.kv_tokens,
                           vocab_size=st.vocab_size, where="prompt",
                           default_max_tokens=DEFAULT_MAX_TOKENS, structured_outputs=so) for p in prompts]
    rids, queue = await st.submit(prompts, params)
    meta = {"id": new_id("cmpl"), "created": int(time.time()), "model": body.model or st.model_name}
    if body.stream:
        return SSEResponse(_stream(st, body, rids, queue, meta))
    final = await collect(st.engine, rids, queue, request)
    outs = [final[r] for r in rids]
    choices = []
    for pi, out in enumerate(outs):
        for c in out.outputs:
            lp = completion_logprobs(st.tokenizer, c.token_ids, c.logprobs or [], body.logprobs) \
                if body.logprobs is not None else None
            choices.append({"index": pi * body.n + c.index, "text": c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(outs)}


async def _stream(st: ServerState, body: CompletionRequest, rids: list[str], queue, meta: dict):
    index = {rid: i for i, rid in enumerate(rids)}
    sent_text: dict[tuple[str, int], str] = {}
    sent_toks: dict[tuple[str, int], int] = {}
    done: set[tuple[str, int]] = set()
    finals: dict[str, RequestOutput] = {}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str, finish: str | None = None, stop_reason=None, logprobs=None) -> str:
        return sse({**meta, "object": "text_completion", "choices": [
            {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}],
            **extra})

    try:
        async with aclosing(iterate(st.engine, rids, queue)) as outs:
            async for out in outs:
                if out.finished:
                    finals[out.request_id] = out
                for c in out.outputs:
                    key, i = (out.request_id, c.index), index[out.request_id] * body.n + c.index
                    if key in done:
                        continue
                    prev, ntok = sent_text.get(key, ""), sent_toks.get(key, 0)
                    delta, new_ids = c.text[len(prev):], c.token_ids[ntok:]
                    lp = None
                    if body.logprobs is not None and new_ids:
                        lp = completion_logprobs(st.tokenizer, new_ids, (c.logprobs or [])[ntok:], body.logprobs,
                                                 offset=len(prev))
                    if delta or lp:
                        yield chunk(i, delta, logprobs=lp)
                    sent_text[key], sent_toks[key] = c.text, len(c.token_ids)
                    if c.finish_reason is not None:
                        yield chunk(i, "", c.finish_reason, c.stop_reason)
                        done.add(key)
    except APIError as e:
        yield sse(error_body(e.status, e.message, code=e.code))
        yield DONE
        return
    if include_usage:
        yield sse({**meta, "object": "text_completion", "choices": [], "usage": usage([finals[r] for r in rids])})
    yield DONE
