"""The FastAPI application around one `LLM` and its engine thread."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from attnzoo.engine.llm import LLM
from attnzoo.server.engine_thread import EngineThread
from attnzoo.server.errors import install_handlers
from attnzoo.server.limits import ServerLimits
from attnzoo.server.metrics import ServerMetrics
from attnzoo.server.middleware import BearerAuth, BodyLimit
from attnzoo.server.routes import router
from attnzoo.server.state import ServerState


def build_app(llm: LLM, model_name: str, *, model_aliases: set[str] | None = None, api_key: str | None = None,
              limits: ServerLimits | None = None, stall_timeout_s: float = 60.0) -> FastAPI:
    """The engine thread starts with the app (lifespan) and stops with it. `app.state.llm` is the engine
    itself, for tests and debugging; only touch it while the server is idle."""
    limits = limits or ServerLimits()
    metrics = ServerMetrics(model_name)
    engine = EngineThread(llm, metrics)
    state = ServerState(llm, engine, metrics, model_name, set(model_aliases or ()), api_key, limits,
                        stall_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            state.close()

    app = FastAPI(title="attnzoo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.llm = llm
    install_handlers(app)
    app.include_router(router)
    # outermost first: the size limit runs before auth so a huge unauthenticated body is cut short
    app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app
