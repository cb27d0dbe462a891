"""The FastAPI application around one engine core (a separate process, engine_client.py)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from attnzoo.server.engine_client import EngineClient
from attnzoo.server.errors import install_handlers
from attnzoo.server.limits import ServerLimits
from attnzoo.server.metrics import ServerMetrics
from attnzoo.server.middleware import BearerAuth, BodyLimit
from attnzoo.server.routes import router
from attnzoo.server.state import ServerState


def build_app(engine: EngineClient, model_name: str, *, model_aliases: set[str] | None = None,
              api_key: str | None = None, limits: ServerLimits | None = None,
              stall_timeout_s: float = 60.0, reasoning_parser: str | None = None,
              tool_call_parser: str | None = None) -> FastAPI:
    """The app reads the core's messages while it runs (lifespan) and stops the core when it stops.
    `app.state.engine` is the `EngineClient`, for tests and debugging (`query_sync("pages")` etc.)."""
    limits = limits or ServerLimits()
    metrics = ServerMetrics(model_name, speculative=engine.info.speculative)
    state = ServerState(engine, metrics, model_name, set(model_aliases or ()), api_key, limits, stall_timeout_s,
                        reasoning_parser, tool_call_parser)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.attach(asyncio.get_running_loop(), metrics)
        try:
            yield
        finally:
            engine.close()
            state.close()

    app = FastAPI(title="attnzoo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.engine = engine
    install_handlers(app)
    app.include_router(router)
    # outermost first: the size limit runs before auth so a huge unauthenticated body is cut short
    app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app
