"""Request fields that constrain the output -> the engine's StructuredOutputsParams, checked here.

`structured_outputs` (vLLM's extra field, both endpoints): exactly one of json, regex, choice, grammar,
json_object. `response_format` (chat, OpenAI's): text, json_object or json_schema. The grammar is compiled
in this process (llguidance, cached) with a time bound before the request is queued, so a schema that does
not compile is a 400 with the compiler's message and the engine core never sees it."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from attnzoo.engine.structured import KINDS, StructuredOutputsParams
from attnzoo.server.errors import APIError, short

if TYPE_CHECKING:
    from attnzoo.server.state import ServerState


def _size(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else len(json.dumps(value).encode())


def parse_structured_outputs(v: dict[str, Any] | None, max_bytes: int) -> StructuredOutputsParams | None:
    if v is None:
        return None
    for k in v:
        if k not in KINDS:
            raise APIError(400, f"structured_outputs.{short(k)} is not supported; use exactly one of "
                                f"{', '.join(KINDS)}", param=f"structured_outputs.{k}")
    given = [k for k in KINDS if v.get(k) is not None and v.get(k) is not False]
    if len(given) != 1:
        raise APIError(400, f"structured_outputs needs exactly one of {', '.join(KINDS)}; got "
                            f"{', '.join(given) if given else 'none'}", param="structured_outputs")
    k = given[0]
    value = v[k]
    ok = {"json": (dict, str), "regex": str, "grammar": str, "choice": list, "json_object": bool}[k]
    if not isinstance(value, ok):
        raise APIError(400, f"structured_outputs.{k} has the wrong type ({type(value).__name__})",
                       param=f"structured_outputs.{k}")
    return _build(max_bytes, f"structured_outputs.{k}", **{k: value})


def parse_response_format(v: dict[str, Any] | None, max_bytes: int) -> StructuredOutputsParams | None:
    if v is None:
        return None
    kind = v.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got "
                            f"{short(kind)}", param="response_format.type")
    js = v.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not js["name"]:
        raise APIError(400, "response_format.json_schema must be an object with a 'name' and a 'schema'",
                       param="response_format.json_schema")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                       param="response_format.json_schema.schema")
    return _build(max_bytes, "response_format.json_schema.schema", json=schema)


def _build(max_bytes: int, param: str, **kw: Any) -> StructuredOutputsParams:
    size = _size(next(iter(kw.values())))
    if size > max_bytes:
        raise APIError(400, f"{param} is {size} bytes; at most {max_bytes} are allowed", param=param)
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def request_constraint(body: Any, st: "ServerState") -> StructuredOutputsParams | None:
    """The request's constraint from structured_outputs or response_format (not both)."""
    rf = getattr(body, "response_format", None)
    if body.structured_outputs is not None and rf is not None and rf.get("type") != "text":
        raise APIError(400, "give either response_format or structured_outputs, not both",
                       param="structured_outputs")
    mb = st.limits.max_grammar_bytes
    return parse_structured_outputs(body.structured_outputs, mb) or parse_response_format(rf, mb)


async def check_grammar(st: "ServerState", so: StructuredOutputsParams, param: str) -> None:
    """Compile in a worker thread (cached; the engine core compiles again from its own cache) with a time bound.
    A compile that runs out of time still ends on its own: llguidance's lexer fuel bounds it."""
    if st.grammar is None:
        raise APIError(400, "structured outputs need the model's tokenizer; this model has none", param=param)
    timeout = st.limits.max_grammar_compile_ms / 1000
    try:
        await asyncio.wait_for(asyncio.to_thread(st.grammar.compile, so), timeout)
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None
    except TimeoutError:
        raise APIError(400, f"{param}: the grammar took longer than {timeout:g} s to compile "
                            f"(--max-grammar-compile-ms)", param=param) from None
