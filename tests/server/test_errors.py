"""Every error in OpenAI's envelope with the right status; bad input never yields a 500."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from attnzoo.server.engine_client import CoreError
from attnzoo.server.errors import APIError
from attnzoo.server.limits import ServerLimits
from tests.server.conftest import HANG_S, assert_no_leak, live_server

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "hi"}]
QUEUE = 3       # sequences that may wait; one runs at a time (max_num_seqs=1)


@pytest.fixture(scope="module")
def live():
    with live_server(api_key=KEY, limits=ServerLimits(max_queued_sequences=QUEUE), max_num_seqs=1) as s:
        yield s


def post(live, path: str, body=None, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(live.url + path, json=body, headers=headers, timeout=HANG_S, **kw)


def post_raw(live, path: str, raw: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    return httpx.post(live.url + path, content=raw, headers=headers, timeout=HANG_S)


def err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_auth(live):
    assert err(post(live, "/v1/chat/completions", {"messages": MSGS}, headers={}), 401)["type"] == \
        "authentication_error"
    err(post(live, "/v1/chat/completions", {"messages": MSGS}, headers={"Authorization": "Bearer nope"}), 401)
    err(httpx.get(live.url + "/v1/models", timeout=HANG_S), 401)
    assert httpx.get(live.url + "/v1/models", headers=AUTH, timeout=HANG_S).status_code == 200
    assert httpx.get(live.url + "/health", timeout=HANG_S).status_code == 200   # probes need no key


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


def chunked_body(size: int) -> tuple[Iterator[bytes], int]:
    """A JSON body of exactly `size` bytes as a generator (httpx sends it chunked, with no Content-Length)."""
    head, tail = b'{"prompt": "', b'"}'
    data = head + b"a" * (size - len(head) - len(tail)) + tail
    return (data[i:i + (64 << 10)] for i in range(0, len(data), 64 << 10)), len(data)


def test_a_chunked_body_over_the_limit_is_a_413(live):
    # no Content-Length to refuse up front: the limit is counted as the chunks arrive (BodyLimit)
    limit = live.app.state.server.limits.max_body_bytes
    body, size = chunked_body(limit + 1)
    r = httpx.post(live.url + C, content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=HANG_S)
    assert size == limit + 1
    assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
    e = err(r, 413)
    assert f"limit of {limit} bytes" in e["message"] and "--max-body-bytes" in e["message"]
    # exactly the limit is read whole and judged on its content (a prompt longer than any context)
    body, size = chunked_body(limit)
    r = httpx.post(live.url + C, content=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=HANG_S)
    assert err(r, 400)["code"] == "context_length_exceeded"
    # and the server goes on serving
    assert httpx.get(live.url + "/health", timeout=HANG_S).status_code == 200
    assert post(live, C, {"prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("raw", [b"not json", b"{", b"[1, 2]", b"null", b'{"messages": [1]}', b"\xff\xfe",
                                 b'{"messages": [{"role": "user"}], "stream": [1]}', b'{"messages": {}}'])
def test_fuzz_malformed(live, raw):
    r = httpx.post(live.url + "/v1/chat/completions", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=HANG_S)
    err(r, 400)


def test_overload_429(live):
    async def go():
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=HANG_S) as c:
            body = {"prompt": "Tell me a story", "max_tokens": 8, "ignore_eos": True}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(12)])
    rs = asyncio.run(go())
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 429 in codes, codes
    assert set(codes) <= {200, 429}
    e = err(next(r for r in rs if r.status_code == 429), 429)
    assert e["code"] == "server_overloaded"
    assert_no_leak(live)


# ---- limits: each names its param and says what is allowed -----------------------------------------
C, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.mark.parametrize("path,body,param,fragment", [
    (C, {"prompt": "x", "n": 129}, "n", "n must be in [1, 128], got 129"),
    (C, {"prompt": "x", "n": 10**6}, "n", "got 1000000"),
    (C, {"prompt": "x", "n": 10**400}, "n", "(401 digits)"),
    (CHAT, {"messages": MSGS, "n": 129}, "n", "[1, 128]"),
    (C, {"prompt": "x", "best_of": 129}, "best_of", "best_of must be in [1, 128]"),
    (C, {"prompt": ["x"] * 65}, "prompt", "list of 65 prompts; at most 64"),
    (C, {"prompt": [[1]] * 65}, "prompt", "at most 64"),
    (C, {"prompt": "x", "stop": [str(i) for i in range(17)]}, "stop", "17 strings; at most 16"),
    (C, {"prompt": "x", "stop": ["ok", "y" * 257]}, "stop.1", "257 characters; at most 256"),
    (C, {"prompt": "x", "stop": "y" * 257}, "stop", "at most 256"),
    (C, {"prompt": "x", "stop": [""]}, "stop.0", "non-empty"),
    (C, {"prompt": "x", "stop": [1]}, "stop", "string or a list of strings"),
    (CHAT, {"messages": MSGS, "stop_token_ids": [2] * 257}, "stop_token_ids", "257 ids; at most 256"),
    (CHAT, {"messages": MSGS, "stop_token_ids": [10**30]}, "stop_token_ids", "[0, 49152), got 10000000...(31"),
    (C, {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be in [0, 20], got 21"),
    (CHAT, {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    (CHAT, {"messages": MSGS * 1025}, "messages", "1025 messages; at most 1024"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 129}]},
     "messages.0.content", "129 parts; at most 128"),
    ("/tokenize", {"messages": MSGS * 1025}, "messages", "at most 1024"),
    (C, {"prompt": "x", "seed": 10**30}, "seed", "9223372036854775807"),
    (C, {"prompt": "x", "seed": -(2**63) - 1}, "seed", "-9223372036854775808"),
    (C, {"prompt": "x", "max_tokens": -(10**400)}, "max_tokens", "max_tokens must be >= 1"),
    (C, {"prompt": "x", "max_tokens": 10**400}, "prompt", "maximum context length"),
    (C, {"prompt": [1, 10**30]}, "prompt", "token ids must be in [0, 49152)"),
    (C, {"prompt": [[1], [-1]]}, "prompt.1", "token ids must be in [0, 49152), got -1"),
    (C, {"prompt": [True]}, "prompt", "list of token ids"),
    ("/detokenize", {"tokens": [1, 10**400]}, "tokens", "(401 digits)"),
    (C, {"prompt": "x", "n": "2"}, "n", "valid integer"),
    (C, {"prompt": "x", "n": True}, "n", "valid integer"),
    (C, {"prompt": "x", "temperature": "1"}, "temperature", "valid number"),
])
def test_limits_name_the_param(live, path, body, param, fragment):
    e = err(post(live, path, body), 400)
    assert e["param"] == param and fragment in e["message"], e


def test_fan_out_beyond_the_queue_is_a_400(live):
    # alone more sequences than may ever wait: no retry can help, so not a 429
    e = err(post(live, C, {"prompt": "x", "n": QUEUE + 1, "max_tokens": 1}), 400)
    assert e["code"] == "too_many_sequences" and f"fans out to {QUEUE + 1} sequences" in e["message"]
    e = err(post(live, C, {"prompt": ["x", "y"], "n": 2, "max_tokens": 1}), 400)
    assert "n=2 x 2 prompts" in e["message"]
    assert post(live, C, {"prompt": ["x", "y", "z"], "n": 1, "max_tokens": 1}).status_code == 200


def test_queue_counts_sequences_not_requests(live):
    eng = live.engine

    async def until(cond, what):
        deadline = time.monotonic() + HANG_S     # a hang guard: each state follows from the requests sent
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def go():
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=HANG_S) as c:
            long = asyncio.create_task(c.post(C, json={"prompt": "Count:", "max_tokens": 400, "ignore_eos": True}))
            await until(lambda: eng.stats.running and not eng.queued(), "the long request to run")
            two = asyncio.create_task(c.post(C, json={"prompt": "x", "n": 2, "max_tokens": 1}))
            await until(lambda: eng.queued() == 2, "two sequences waiting")
            # one request waits, but two sequences: another 2 would make 4 > 3; 1 more fits
            over = await c.post(C, json={"prompt": "x", "n": 2, "max_tokens": 1})
            fits = asyncio.create_task(c.post(C, json={"prompt": "x", "max_tokens": 1}))
            await until(lambda: eng.queued() == 3, "three sequences waiting")
            long.cancel()            # hang up: the long request is aborted and the queue drains
            return over, await two, await fits
    over, two, fits = asyncio.run(go())
    e = err(over, 429)
    assert e["code"] == "server_overloaded" and f"more than {QUEUE} sequences" in e["message"]
    assert two.status_code == fits.status_code == 200 and len(two.json()["choices"]) == 2
    assert_no_leak(live)


def test_huge_top_k_is_no_top_k(live):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 11}
    plain = post(live, C, body).json()["choices"][0]["text"]
    for top_k in (49152, 10**30):
        r = post(live, C, {**body, "top_k": top_k})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain


def test_edge_seeds_run(live):
    # the largest seed, with n children seeded seed + i, must not overflow the engine's generators
    for seed in (2**63 - 1, -(2**63)):
        r = post(live, C, {"prompt": "x", "max_tokens": 2, "n": 2, "seed": seed})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_prompt_too_long_to_fit_is_refused_before_tokenising(live, monkeypatch):
    st = live.app.state.server
    tokenised = []
    monkeypatch.setattr(st, "encode", lambda text: tokenised.append(text))
    e = err(post(live, C, {"prompt": "ab" * (st.max_prompt_chars // 2 + 1)}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "prompt" and "characters" in e["message"]
    e = err(post(live, CHAT, {"messages": [{"role": "user", "content": "a" * st.max_prompt_chars}]}), 400)
    assert e["param"] == "messages" and "however it is tokenised" in e["message"]
    e = err(post(live, "/tokenize", {"prompt": "a" * (st.max_prompt_chars + 1)}), 400)
    assert e["param"] == "prompt" and e["code"] == "context_length_exceeded"
    assert tokenised == []
    # the bound is sound: the longest token times the context
    longest = max(len(st.tokenizer.decode([i], skip_special_tokens=False)) for i in range(st.vocab_size))
    assert st.max_prompt_chars >= longest * st.max_model_len


# ---- text that is not valid Unicode, numbers that do not fit ----------------------------------------
@pytest.mark.parametrize("path,raw,param", [
    (C, b'{"prompt": "\\ud800"}', "prompt"),
    (C, b'{"prompt": ["ok", "a\\udfffb"]}', "prompt.1"),
    (C, b'{"model": "\\ud800", "prompt": "x"}', "model"),      # was a crash rendering the 404
    (C, b'{"prompt": "x", "stop": ["ok", "\\udc00"]}', "stop.1"),
    (C, b'{"prompt": "x", "user": "\\ud800"}', "user"),
    (C, b'{"prompt": "x", "\\ud800": 1}', None),
    (C, b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages.0.content"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages.0.content.0.text"),
    ("/tokenize", b'{"prompt": "\\udfff"}', "prompt"),
    (C, b'{"prompt": "x", "temperature": 1e400}', "temperature"),
    (C, b'{"prompt": "x", "top_p": NaN}', "top_p"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -Infinity}', "presence_penalty"),
    (C, b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}", "n"),
    (C, b'{"prompt": "x", "temperature": "1e400"}', "temperature"),
])
def test_bad_text_and_numbers_are_400s(live, path, raw, param):
    e = err(post_raw(live, path, raw), 400)
    assert e["param"] == param, e
    if b"\\u" in raw:
        assert "not valid Unicode" in e["message"] and "\\ud" in e["message"]


@pytest.mark.parametrize("raw,ctype,status,fragment", [
    (b"", "application/json", 400, "empty"),
    (b'{"prompt": "x"}', "text/plain", 415, "Content-Type: application/json"),
    (b'{"prompt": "x"}', "application/x-www-form-urlencoded", 415, "JSON"),
    (b'{"prompt": "\xff"}', "application/json", 400, "not valid UTF-8 (byte 0xff"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "nested too deeply"),
    (b'{"prompt": "x"', "application/json", 400, "not valid JSON"),
    (b'"x"', "application/json", 400, "must be a JSON object, got a string"),
])
def test_malformed_bodies(live, raw, ctype, status, fragment):
    e = err(post_raw(live, C, raw, ctype), status)
    assert fragment in e["message"], e


def test_bom_and_missing_content_type_are_accepted(live):
    assert post_raw(live, C, b'\xef\xbb\xbf{"prompt": "x", "max_tokens": 1}').status_code == 200
    assert post_raw(live, C, b'{"prompt": "x", "max_tokens": 1}', None).status_code == 200


@pytest.mark.parametrize("body", [
    {"prompt": "x", "n": 129}, {"prompt": "x" * 700_000}, {"prompt": [10**7]}, {"prompt": "x", "seed": 2**64},
])
def test_invalid_streams_fail_before_the_stream(live, body):
    with httpx.stream("POST", live.url + C, json={**body, "stream": True}, headers=AUTH, timeout=HANG_S) as r:
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
        r.read()
    err(r, 400)


def test_the_error_path_cannot_raise(live, monkeypatch):
    st = live.app.state.server

    def hostile_404(name):
        raise APIError(404, f"The model `\ud800{name}` does not exist", param="model\udfff")
    monkeypatch.setattr(st, "check_model", hostile_404)
    e = err(post(live, C, {"prompt": "x"}), 404)
    assert e["message"].startswith("The model `\\ud800") and e["param"] == "model\\udfff"

    def bug(name):
        raise RuntimeError("\ud800")
    monkeypatch.setattr(st, "check_model", bug)
    e = err(post(live, C, {"prompt": "x"}), 500)
    assert e["message"] == "internal error: RuntimeError" and e["type"] == "server_error"


def test_an_add_the_core_refuses_with_a_bug_is_a_500(live, monkeypatch):
    # the core keeps running after such an add: tests/server/test_engine_core.py
    def refused(items, queue):      # what EngineClient makes of a core's non-ValueError refusal
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(CoreError("OverflowError: a bug in add_request"))
        return [fut]
    monkeypatch.setattr(live.engine, "add_all", refused)
    err(post(live, C, {"prompt": "x", "max_tokens": 1}), 500)
    monkeypatch.undo()
    assert httpx.get(live.url + "/health", timeout=HANG_S).status_code == 200
    assert post(live, C, {"prompt": "x", "max_tokens": 1}).status_code == 200
    assert_no_leak(live)
