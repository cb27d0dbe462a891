"""POST /v1/chat/completions: the model's chat template, n choices, streamed or not; structured outputs
(response_format, structured_outputs), tool calls (server/tools.py) and reasoning split from the answer
(`--reasoning-parser`, server/reasoning.py)."""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import replace

from fastapi import Request
from jinja2 import TemplateError

from attnzoo.server.constraints import check_grammar, request_constraint
from attnzoo.server.errors import APIError, error_body, short
from attnzoo.server.logprobs import chat_logprobs
from attnzoo.server.outputs import collect, iterate, usage
from attnzoo.server.params import build_params
from attnzoo.server.protocol import ChatMessage, ChatRequest
from attnzoo.server.reasoning import ReasoningParser, get_reasoning_parser
from attnzoo.server.sse import DONE, SSEResponse, sse
from attnzoo.server.state import ServerState, new_id
from attnzoo.server.tool_parsers import HermesToolParser, ToolParser, get_tool_parser
from attnzoo.server.tools import check_tools, template_messages, tool_constraint, tool_mode


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


def render(st: ServerState, body: ChatRequest | list[ChatMessage], add_generation_prompt: bool = True) -> str:
    if isinstance(body, list):   # /tokenize: messages only
        body = ChatRequest(messages=body)
    texts = [_text(m, i) for i, m in enumerate(body.messages)]
    convo, tools = template_messages(body, texts, st.tokenizer.chat_template)
    try:
        return st.tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, tools=tools)
    except (ValueError, TemplateError) as e:
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None


class _Parse:
    """One choice's text -> reasoning, content and tool calls; whole (`message`) or as stream deltas."""

    def __init__(self, reasoning: type[ReasoningParser] | None, tools: type[ToolParser] | None):
        self.reasoning = reasoning() if reasoning else None
        self.tools = tools() if tools else None
        self.called = False

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" else reason

    def message(self, text: str) -> dict:
        msg: dict = {"role": "assistant"}
        if self.reasoning:
            msg["reasoning_content"], text = self.reasoning.split(text)
        if self.tools:
            text, calls = self.tools.parse(text)
            if calls:
                self.called = True
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        msg["content"] = text if text or "tool_calls" not in msg else None
        return msg

    def deltas(self, text: str, final: bool = False) -> list[dict]:
        reasoning, content = "", text
        if self.reasoning:
            reasoning, content = self.reasoning.feed(text)
            if final:
                r, c = self.reasoning.finish()
                reasoning, content = reasoning + r, content + c
        out = [{"reasoning_content": reasoning}] if reasoning else []
        if self.tools:
            content, calls = self.tools.feed(content)
            if final:
                c, more = self.tools.finish()
                content, calls = content + c, calls + more
            self.called = self.called or bool(calls)
            out += [{"tool_calls": [d.to_openai()]} for d in calls]
        return ([{"content": content}] if content else []) + out


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
    check_tools(body, st.limits.max_tools, st.limits.max_grammar_bytes)
    mode = tool_mode(body)
    so, forced = request_constraint(body, st), tool_constraint(body, mode)
    if so is not None and forced is not None:
        raise APIError(400, f"tool_choice {short(body.tool_choice)} constrains the output already; it cannot be "
                            "combined with response_format or structured_outputs", param="tool_choice")
    so = so or forced
    if so is not None:
        if st.reasoning_parser:   # the grammar starts once the model's reasoning ends
            so = replace(so, after=get_reasoning_parser(st.reasoning_parser).end)
        await check_grammar(st, so, "tool_choice" if forced else "structured_outputs"
                            if body.structured_outputs is not None else "response_format")
    ids = await st.encode_prompt(render(st, body, body.add_generation_prompt), "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = build_params(body, max_tokens=max_tokens, logprobs=n_top, prompt_len=len(ids),
                          max_model_len=st.max_model_len, kv_tokens=st.kv_tokens,
                          vocab_size=st.vocab_size, where="messages", structured_outputs=so)
    rids, queue = await st.submit([ids], [params])
    meta = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": body.model or st.model_name}
    reasoning = get_reasoning_parser(st.reasoning_parser) if st.reasoning_parser else None
    tools = HermesToolParser if forced else get_tool_parser(st.tool_parser) if mode == "auto" else None
    parse = lambda: _Parse(reasoning, tools)  # noqa: E731
    if body.stream:
        return SSEResponse(_stream(st, body, rids[0], queue, meta, n_top, parse))
    out = (await collect(st.engine, rids, queue, request))[rids[0]]
    choices = []
    for c in out.outputs:
        p = parse()
        choices.append({"index": c.index, "message": p.message(c.text),
                        "logprobs": chat_logprobs(st.tokenizer, c.token_ids, c.logprobs or [], n_top)
                        if n_top is not None else None,
                        "finish_reason": p.finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage([out])}


async def _stream(st: ServerState, body: ChatRequest, rid: str, queue, meta: dict, n_top: int | None, parse):
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    sent_text, sent_toks, done = [""] * body.n, [0] * body.n, set()
    parsers = [parse() for _ in range(body.n)]
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
                    deltas = parsers[i].deltas(delta, final=c.finish_reason is not None)
                    if lp and not deltas:
                        deltas = [{"content": ""}]
                    for j, d in enumerate(deltas):   # the tokens' logprobs ride on the first delta
                        yield chunk(i, d, logprobs=lp if j == 0 else None)
                    sent_text[i], sent_toks[i] = c.text, len(c.token_ids)
                    if c.finish_reason is not None:
                        yield chunk(i, {}, parsers[i].finish_reason(c.finish_reason), c.stop_reason)
                        done.add(i)
    except APIError as e:
        yield sse(error_body(e.status, e.message, code=e.code))
        yield DONE
        return
    if include_usage and final is not None:
        yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage([final])})
    yield DONE
