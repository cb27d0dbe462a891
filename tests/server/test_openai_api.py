"""The official openai client (sync and async) and raw SSE against a live server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server.conftest import live_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def live():
    with live_server() as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient(live):
    return openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


CHAT = [{"role": "user", "content": "Name three colours."}]


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]


def test_completion_and_usage(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_async_chat(aclient):
    async def go():
        return await aclient.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0)
    r = asyncio.run(go())
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.object == "chat.completion"


def test_chat_stream_with_usage(client):
    chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0)
    assert text == full.choices[0].message.content


def test_raw_sse_order(live):
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = objs[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] in ("stop", "length")
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["total_tokens"] > 0
    assert all(o["choices"][0]["finish_reason"] is None for o in objs[:-2])


def test_completion_stream_matches(client):
    args = dict(model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args))
    assert text == client.completions.create(**args).choices[0].text


def test_n_choices(client):
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=1, n=3, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    chunks = list(client.completions.create(model="smollm2", prompt="Hello", max_tokens=5, n=2, temperature=1,
                                            stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_logprobs(client):
    r = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].logprob == pytest.approx(max(x.logprob for x in content[0].top_logprobs))  # greedy
    c = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=1)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3


def test_seed_reproducible(client):
    args = dict(model="smollm2", messages=CHAT, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**args).choices[0].message.content
    b = client.chat.completions.create(**args).choices[0].message.content
    assert a == b


def test_stop_string_never_leaks(client):
    args = dict(model="smollm2", prompt="List the days of the week: Monday, Tuesday,", max_tokens=16, temperature=0)
    full = client.completions.create(**args).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2][:3]                         # something the greedy answer will produce
    want = full[:full.index(stop)]
    r = client.completions.create(stop=[stop], **args).choices[0]
    assert r.finish_reason == "stop" and stop not in r.text and r.text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **args))
    assert streamed == want


def test_health_metrics_tokenize(live, client):
    client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    assert httpx.get(live.url + "/health").status_code == 200
    text = httpx.get(live.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total", "request_success_total", "time_to_first_token_seconds",
                 "inter_token_latency_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert f"attnzoo:{name}" in text, name
    assert "spec_decode" not in text    # only with --speculative-config (tests/server/test_speculative_server.py)
    ids = httpx.post(live.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    back = httpx.post(live.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert back["prompt"] == "hello world"
