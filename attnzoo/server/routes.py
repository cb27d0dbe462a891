"""The HTTP endpoints; the work is in chat.py and completions.py."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from attnzoo.server.chat import create_chat, render
from attnzoo.server.completions import create_completion
from attnzoo.server.errors import APIError, error_response
from attnzoo.server.body import read_body
from attnzoo.server.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from attnzoo.server.state import ServerState

router = APIRouter()
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/v1/models")
async def models(request: Request) -> dict:
    st = _state(request)
    root = next(iter(st.model_aliases), st.model_name)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                        "owned_by": "attnzoo", "root": root, "parent": None,
                                        "max_model_len": st.max_model_len}]}


@router.post("/v1/completions")
async def completions(request: Request):
    return await create_completion(await read_body(request, CompletionRequest), request, _state(request))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await create_chat(await read_body(request, ChatRequest), request, _state(request))


@router.get("/health")
async def health(request: Request) -> Response:
    st = _state(request)
    eng = st.engine
    stalled = time.monotonic() - eng.last_step_time
    if eng.alive and eng.busy and stalled > st.stall_timeout_s:
        return error_response(503, f"engine has not completed a step for {stalled:.0f} s", code="engine_stalled")
    # the core answers between steps; a dead tensor-parallel worker is reported before a step meets it
    if (why := await eng.health_error(st.stall_timeout_s)) is not None:
        return error_response(503, f"engine is not running: {why}", code="engine_dead")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    body, st = await read_body(request, TokenizeRequest), _state(request)
    st.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        st.limits.check_messages(body.messages)
    text = body.prompt if body.prompt is not None else render(st, body.messages, body.add_generation_prompt)
    # text that cannot fit the context is refused here too: tokenising megabytes costs hundreds of MB
    ids = await st.encode_prompt(text, "prompt" if body.prompt is not None else "messages")
    return {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict:
    body, st = await read_body(request, DetokenizeRequest), _state(request)
    st.check_model(body.model)
    return {"prompt": st.tokenizer.decode(st.check_token_ids(body.tokens, "tokens"))}


@router.get("/", response_class=HTMLResponse)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))
