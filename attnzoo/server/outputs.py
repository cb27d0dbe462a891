"""Reading a request's snapshots back from its queue, aborting whatever the handler leaves unfinished."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from attnzoo.engine.outputs import RequestOutput
from attnzoo.server.engine_client import EngineClient
from attnzoo.server.errors import APIError

_GONE = object()


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    # The body has been read, so the next ASGI message is the disconnect (as StreamingResponse listens).
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(_GONE)


async def iterate(engine: EngineClient, rids: list[str], queue: asyncio.Queue,
                  request: Request | None = None) -> AsyncIterator[RequestOutput]:
    """Snapshots of `rids` until all finished. With `request`, watch for a vanished client (Starlette does not
    cancel non-streaming handlers on disconnect). Anything unfinished when this ends is aborted."""
    pending = set(rids)
    watcher = asyncio.create_task(_watch_disconnect(request, queue)) if request is not None else None
    try:
        while pending:
            item = await queue.get()
            if item is _GONE:
                raise APIError(499, "client disconnected")
            if isinstance(item, BaseException):
                raise APIError(503, str(item), code="engine_dead")
            if item.finished:
                pending.discard(item.request_id)
            yield item
    finally:
        if watcher is not None:
            watcher.cancel()
        for rid in pending:
            engine.abort(rid)


async def collect(engine: EngineClient, rids: list[str], queue: asyncio.Queue,
                  request: Request) -> dict[str, RequestOutput]:
    final: dict[str, RequestOutput] = {}
    async for out in iterate(engine, rids, queue, request):
        final[out.request_id] = out
    return final


def usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outs)}}
