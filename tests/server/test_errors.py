"""Every error in OpenAI's envelope with the right status; bad input never yields a 500."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server.conftest import assert_no_leak, live_server

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def live(model):
    with live_server(model, api_key=KEY, max_queued_requests=1, max_num_seqs=1) as s:
        yield s


def post(live, path: str, body=None, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(live.url + path, json=body, headers=headers, timeout=60, **kw)


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_auth(live):
    assert err(post(live, "/v1/chat/completions", {"messages": MSGS}, headers={}), 401)["type"] == \
        "authentication_error"
    err(post(live, "/v1/chat/completions", {"messages": MSGS}, headers={"Authorization": "Bearer nope"}), 401)
    err(httpx.get(live.url + "/v1/models"), 401)
    assert httpx.get(live.url + "/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(live.url + "/health").status_code == 200   # probes need no key


def test_unknown_model(live):
    e = err(post(live, "/v1/chat/completions", {"model": "gpt-4", "messages": MSGS, "max_tokens": 1}), 404)
    assert e["code"] == "model_not_found" and e["param"] == "model"


@pytest.mark.parametrize("body,param", [
    ({"messages": MSGS, "temperature": -1}, "temperature"),
    ({"messages": MSGS, "top_p": 2}, "top_p"),
    ({"messages": MSGS, "n": 0}, "n"),
    ({"messages": MSGS, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSGS, "temperature": "hot"}, "temperature"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"model": "smollm2"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": MSGS, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": MSGS, "stop_token_ids": [10**7]}, "stop_token_ids"),
    ({"messages": MSGS, "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_chat_invalid_fields(live, body, param):
    e = err(post(live, "/v1/chat/completions", body), 400)
    assert e["type"] == "invalid_request_error" and e["param"] == param


@pytest.mark.parametrize("body", [
    {"prompt": ""}, {"prompt": []}, {"prompt": [10**7, 1]}, {"prompt": "x", "echo": True},
    {"prompt": "x", "logprobs": 99}, {"prompt": 5}, {"prompt": "x", "max_tokens": None, "n": -2},
])
def test_completion_invalid(live, body):
    err(post(live, "/v1/completions", body), 400)


def test_context_length(live):
    e = err(post(live, "/v1/completions", {"prompt": [1000] * 9000, "max_tokens": 1}), 400)
    assert e["code"] == "context_length_exceeded" and "8192" in e["message"] and "9000" in e["message"]
    e = err(post(live, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 100000}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "messages" and "100000" in e["message"]


def test_body_too_large(live):
    e = err(post(live, "/v1/completions", {"prompt": "x" * (3 << 20)}), 413)
    assert "bytes" in e["message"]


@pytest.mark.parametrize("raw", [b"not json", b"{", b"[1, 2]", b"null", b'{"messages": [1]}', b"\xff\xfe",
                                 b'{"messages": [{"role": "user"}], "stream": [1]}', b'{"messages": {}}'])
def test_fuzz_malformed(live, raw):
    r = httpx.post(live.url + "/v1/chat/completions", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"})
    err(r, 400)


def test_overload_429(live):
    async def go():
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=60) as c:
            body = {"prompt": "Tell me a story", "max_tokens": 8, "ignore_eos": True}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(8)])
    rs = asyncio.run(go())
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 429 in codes, codes
    assert set(codes) <= {200, 429}
    e = err(next(r for r in rs if r.status_code == 429), 429)
    assert e["code"] == "server_overloaded"
    assert_no_leak(live)
