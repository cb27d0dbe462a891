"""Pure ASGI middleware (BaseHTTPMiddleware would break streaming and disconnect detection):
a request-body size limit and bearer-key auth for /v1."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attnzoo.server.errors import error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_big(scope, receive, send)
            return await self.app(scope, receive, send)   # the server enforces a declared length
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # chunked upload: buffer up to the limit, then replay it to the app (a list, not `+=`: a client
        # trickling one byte per message would make concatenation quadratic)
        parts, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            parts.append(msg.get("body", b""))
            size += len(parts[-1])
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_big(scope, receive, send)
        body, replayed = b"".join(parts), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_big(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes "
                                  f"(--max-body-bytes)")(scope, receive, send)


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str | None, prefix: str = "/v1"):
        self.app, self.prefix = app, prefix
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(got, self.expected):
            msg = "missing API key" if not got else "invalid API key"
            return await error_response(401, f"{msg}: send `Authorization: Bearer <key>`",
                                        code="invalid_api_key")(scope, receive, send)
        await self.app(scope, receive, send)
