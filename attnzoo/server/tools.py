"""Tool calling on /v1/chat/completions: validating `tools` / `tool_choice`, rendering tools and tool turns
through the chat template, and the constraint that enforces `"required"` and named choices.

- "none": tools are rendered, the output is plain content. "auto": the model answers in its own format and
  the family's parser (server/tool_parsers.py, `--tool-call-parser`, else detected from the template)
  reads the calls out of it.
- "required" / a named function: the output is constrained (engine/structured.py) to hermes-style blocks
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` whose arguments follow the function's
  parameter schema (one block unless parallel_tool_calls), read back with the hermes parser.
- A chat template that does not mention `tools` (the default model's) gets them in the system message,
  hermes-style, and earlier calls and tool results as text, so any model can be offered tools.
"""

from __future__ import annotations

import json
from typing import Any

from attnzoo.engine.structured import StructuredOutputsParams
from attnzoo.server.errors import APIError, short
from attnzoo.server.protocol import ChatRequest

NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}
# compact JSON inside the blocks: flexible whitespace lets a small model pad forever
_COMPACT = {"x-guidance": {"whitespace_flexible": False}}

FALLBACK_PROMPT = """You may call functions to help answer. The functions, as JSON schemas:
<tools>
{tools}
</tools>
To call functions, answer with one block per call and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}
</tool_call>"""


def tool_mode(body: ChatRequest) -> str:
    """none | auto | required | named, after checking tool_choice against the tools (400s name the field)."""
    choice, names = body.tool_choice, [t.function.name for t in body.tools or []]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    if choice is None:
        return "auto" if names else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not names:
            raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", param="tool_choice")
    if fn["name"] not in names:
        raise APIError(400, f"tool_choice names the function {short(fn['name'])}, which is not in tools "
                            f"({', '.join(names) or 'none given'})", param="tool_choice")
    return "named"


def check_tools(body: ChatRequest, max_tools: int, max_bytes: int) -> None:
    tools = body.tools or []
    if len(tools) > max_tools:
        raise APIError(400, f"tools has {len(tools)} functions; at most {max_tools} are allowed", param="tools")
    size = len(json.dumps([t.model_dump() for t in tools]).encode())
    if size > max_bytes:
        raise APIError(400, f"tools is {size} bytes; at most {max_bytes} are allowed", param="tools")
    for i, t in enumerate(tools):
        p = t.function.parameters
        if p is not None and p.get("type", "object") != "object":
            raise APIError(400, f"tools.{i}.function.parameters must be a JSON schema of type object",
                           param=f"tools.{i}.function.parameters")


def tool_constraint(body: ChatRequest, mode: str) -> StructuredOutputsParams | None:
    """The grammar for "required" (any of the tools) and named choices (that one): hermes blocks."""
    if mode not in ("required", "named"):
        return None
    tools = [t.function for t in body.tools or []]
    if mode == "named":
        tools = [f for f in tools if f.name == body.tool_choice["function"]["name"]]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f.name}, "arguments": f.parameters or NO_ARGS}} for f in tools]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), **_COMPACT}
    more = ' ("\\n" call)*' if body.parallel_tool_calls and mode == "required" else ""
    lark = f'start: call{more}\ncall: "<tool_call>\\n" %json {json.dumps(schema)} "\\n</tool_call>"\n'
    return StructuredOutputsParams(grammar=lark)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text   # templates print what they get; a client's malformed arguments stay as they were


def template_messages(body: ChatRequest, texts: list[str], template: str | None) -> tuple[list[dict], list | None]:
    """The conversation for the chat template, and the tools to pass it (None when it takes none: then they are
    in the system message). `texts`: each message's text content, already flattened."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    native = bool(template and "tools" in template)
    convo = []
    for m, text in zip(body.messages, texts):
        d: dict[str, Any] = {"role": m.role, "content": text}
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                              "arguments": _arguments(c.function.arguments)}}
                 for c in m.tool_calls or []]
        if native:
            if calls:
                d["tool_calls"] = calls
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
        elif calls:   # as the hermes blocks the fallback prompt asks for
            d["content"] = "\n".join([text] * bool(text) + [
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                + "\n</tool_call>" for c in calls])
        elif m.role == "tool":
            d = {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
        convo.append(d)
    if tools and not native:
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
        if convo and convo[0]["role"] == "system":
            convo[0] = {**convo[0], "content": convo[0]["content"] + "\n\n" + prompt}
        else:
            convo.insert(0, {"role": "system", "content": prompt})
    return convo, (tools or None) if native else None
