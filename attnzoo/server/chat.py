"""POST /v1/chat/completions: the model's chat template, n choices, streamed or not."""

from __future__ import annotations

import time
from contextlib import aclosing

from fastapi import Request
from jinja2 import TemplateError

from attnzoo.server.errors import APIError, error_body, short
from attnzoo.server.logprobs import chat_logprobs
from attnzoo.server.outputs import collect, iterate, usage
from attnzoo.server.params import build_params
from attnzoo.server.protocol import ChatMessage, ChatRequest
from attnzoo.server.sse import DONE, SSEResponse, sse
from attnzoo.server.state import ServerState, new_id


def _text(m: ChatMessage, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}].content: only text parts are supported, got {short(part.get('type'))}",
                           param=f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


def render(st: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    convo = [{"role": m.role, "content": _text(m, i)} for i, m in enumerate(messages)]
    try:
        return st.tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt)
    except (ValueError, TemplateError) as e:
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None


def _top_logprobs(body: ChatRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


async def create_chat(body: ChatRequest, request: Request, st: ServerState):
    st.check_model(body.model)
    st.limits.check_request(body, vocab_size=st.vocab_size)
    st.limits.check_messages(body.messages)
    st.limits.check_logprobs(body.top_logprobs, "top_logprobs")
    n_top = _top_logprobs(body)
    ids = await st.encode_prompt(render(st, body.messages, body.add_generation_prompt), "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = build_params(body, max_tokens=max_tokens, logprobs=n_top, prompt_len=len(ids),
                          max_model_len=st.max_model_len, kv_tokens=st.kv_tokens,
                          vocab_size=st.vocab_size, where="messages")
    rids, queue = await st.submit([ids], [params])
    meta = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": body.model or st.model_name}
    if body.stream:
        return SSEResponse(_stream(st, body, rids[0], queue, meta, n_top))
    out = (await collect(st.engine, rids, queue, request))[rids[0]]
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(st.tokenizer, c.token_ids, c.logprobs or [], n_top)
                if n_top is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage([out])}


async def _stream(st: ServerState, body: ChatRequest, rid: str, queue, meta: dict, n_top: int | None):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    sent_text, sent_toks, done = [""] * body.n, [0] * body.n, set()
    final = None

    def chunk(i: int, delta: dict, finish: str | None = None, stop_reason=None, logprobs=None) -> str:
        return sse({**meta, "object": "chat.completion.chunk", "choices": [
            {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
             **({"stop_reason": stop_reason} if finish else {})}], **extra})

    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    try:
        async with aclosing(iterate(st.engine, [rid], queue)) as outs:
            async for out in outs:
                final = out
                for c in out.outputs:
                    i = c.index
                    if i in done:
                        continue
                    delta, new_ids = c.text[len(sent_text[i]):], c.token_ids[sent_toks[i]:]
                    lp = chat_logprobs(st.tokenizer, new_ids, (c.logprobs or [])[sent_toks[i]:], n_top) \
                        if n_top is not None and new_ids else None
                    if delta or lp:
                        yield chunk(i, {"content": delta}, logprobs=lp)
                    sent_text[i], sent_toks[i] = c.text, len(c.token_ids)
                    if c.finish_reason is not None:
                        yield chunk(i, {}, c.finish_reason, c.stop_reason)
                        done.add(i)
    except APIError as e:
        yield sse(error_body(e.status, e.message, code=e.code))
        yield DONE
        return
    if include_usage and final is not None:
        yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage([final])})
    yield DONE
