"""A request body from bytes to a validated model, with a 4xx in OpenAI's envelope for whatever is wrong:
not JSON, not an object, nested too deeply, numbers that do not fit, text that is not valid Unicode."""

from __future__ import annotations

import json
import math
import re
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from attnzoo.server.errors import APIError, short, validation_error

T = TypeVar("T", bound=BaseModel)

# JSON can only smuggle a lone surrogate in through a \uD800-\uDFFF escape (raw bytes must be valid
# UTF-8), so bodies without one skip the walk over every string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")

_JSON_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


class _BadNumber:
    """Stands in for a number Python would read as inf, NaN or not at all, so the walk can name its field."""

    def __init__(self, text: str, why: str):
        self.text, self.why = text, why


_SUSPECT = (str, _BadNumber, dict, list)   # what the walk looks into (not the ints of a token-id list)


def _surrogate(s: str) -> str | None:
    """The first lone surrogate of `s` as an escape (`\\ud800`), or None when UTF-8 can encode `s`."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"\\u{ord(s[e.start]):04x}"


def find_bad_value(obj: object) -> tuple[str, str] | None:
    """(path such as `messages.0.content`, what is wrong) for the first string, key or number in `obj` that
    must be refused, else None. Iterative: json has bounded the depth, but a recursion would need a guard."""
    stack: list[tuple[object, tuple]] = [(obj, ())]
    while stack:
        v, path = stack.pop()
        where = ".".join(map(str, path))
        if isinstance(v, str):
            if (bad := _surrogate(v)) is not None:
                return where, f"holds text that is not valid Unicode (a lone surrogate {bad}); send UTF-8 text"
        elif isinstance(v, _BadNumber):
            return where, f"is {short(v.text, 40)}: {v.why}"
        elif isinstance(v, dict):
            for k in v:
                if (bad := _surrogate(k)) is not None:
                    return where, f"has a key that is not valid Unicode (a lone surrogate {bad}); send UTF-8 text"
            stack.extend((x, path + (k,)) for k, x in reversed(v.items()) if isinstance(x, _SUSPECT))
        elif isinstance(v, list):
            stack.extend((v[i], path + (i,)) for i in range(len(v) - 1, -1, -1) if isinstance(v[i], _SUSPECT))
    return None


def decode_json(raw: bytes) -> dict:
    """Bytes -> a JSON object of finite numbers and valid Unicode, or a 400 that says what is wrong."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                            f"{e.start})") from None
    bad_numbers: list[_BadNumber] = []

    def bad(text: str, why: str) -> _BadNumber:
        bad_numbers.append(b := _BadNumber(text, why))
        return b

    def parse_float(t: str) -> float | _BadNumber:
        v = float(t)
        return v if math.isfinite(v) else bad(t, "out of range for a 64-bit float")

    def parse_int(t: str) -> int | _BadNumber:
        try:
            return int(t)
        except ValueError:     # more than 4300 digits (Python's guard against quadratic conversions)
            return bad(t, "more than 4300 digits")

    try:
        obj = json.loads(text, parse_float=parse_float, parse_int=parse_int,
                         parse_constant=lambda t: bad(t, "not a number JSON allows"))
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if bad_numbers or _SURROGATE_ESCAPE.search(raw):
        found = find_bad_value(obj)
        if found is not None:
            where, what = found
            raise APIError(400, f"{where or 'the request body'} {what}", param=where or None)
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_JSON_NAMES.get(type(obj), 'null')}")
    return obj


def _json_content_type(request: Request) -> bool:
    """A missing Content-Type is taken as JSON (as FastAPI does); any other must say JSON."""
    ctype = request.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
    return ctype in ("", "application/json") or ctype.endswith("+json")


async def read_body(request: Request, model: type[T]) -> T:
    if not _json_content_type(request):
        raise APIError(415, f"the request body must be JSON: send Content-Type: application/json, not "
                            f"{short(request.headers.get('content-type'), 80)}")
    obj = decode_json(await request.body())
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None
