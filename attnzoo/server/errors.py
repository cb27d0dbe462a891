"""OpenAI's error envelope, used for every error the server returns (mixed envelopes break clients).
Rendering an error can never raise: messages often quote what the client sent, which may be anything.
FastAPI is imported where it is used, so the command line (which imports the limits) starts fast."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.responses import Response

log = logging.getLogger("attnzoo.server")

_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_exceeded",
          503: "service_unavailable"}
MAX_MESSAGE_CHARS = 2000   # a message quoting a huge value stays readable (and small)


def _type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _type(status)


def short(value: object, limit: int = 60) -> str:
    """repr of a client's value for a message, cut to `limit` characters (400-digit numbers, long names)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit - 12]}...({len(r)} chars)"


def num(v: int) -> str:
    """An integer for a message: a 400-digit one is shown by its size."""
    s = str(v)
    return s if len(s) <= 24 else f"{s[:8]}...({len(s.lstrip('-'))} digits)"


def _text(s: object, limit: int | None = None) -> str | None:
    """Any value as text that encodes to UTF-8: lone surrogates become \\udXXX escapes."""
    if s is None:
        return None
    try:
        t = s if isinstance(s, str) else str(s)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the error path
        t = f"<{type(s).__name__}>"
    t = t.encode("utf-8", "backslashreplace").decode("utf-8")
    return t if limit is None or len(t) <= limit else t[:limit] + "..."


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict:
    return {"error": {"message": _text(message, MAX_MESSAGE_CHARS) or "error", "type": _text(type) or _type(status),
                      "param": _text(param, 200), "code": _text(code)}}


def error_response(status: int, message: str, **kw) -> Response:
    from starlette.responses import Response
    # ensure_ascii: the body is plain ASCII whatever error_body was handed
    return Response(json.dumps(error_body(status, message, **kw)), status_code=status,
                    media_type="application/json")


# SamplingParams' messages start with the field name ("top_p must be in (0, 1], ...").
_PARAMS = {"n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "min_tokens", "logprobs", "stop", "stop_token_ids", "prompt"}


def from_value_error(e: ValueError) -> APIError:
    """A ValueError from the engine's validation, as a 400 naming the field when it can."""
    msg = str(e)
    first = msg.split(" ", 1)[0]
    return APIError(400, msg, param=first if first in _PARAMS else None)


def validation_error(errors: list[dict]) -> APIError:
    """The first of pydantic's errors as a 400 naming the field: `messages.0.role: Input should be ...`."""
    if not errors:
        return APIError(400, "invalid request body")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {e.get('msg')}")
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    where = ".".join(loc)
    return APIError(400, f"{where}: {msg}" if where else msg, param=where or None)


def install_handlers(app: FastAPI) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        e = validation_error(list(exc.errors()))
        return error_response(e.status, e.message, param=e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> Response:
        try:
            log.exception("unhandled error")
        except Exception:  # noqa: BLE001 - logging a hostile message must not turn a 500 into a dropped connection
            pass
        return error_response(500, f"internal error: {type(exc).__name__}")
