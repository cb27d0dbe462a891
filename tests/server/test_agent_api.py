"""The agent API through the official openai client against a live server on the default model: structured
outputs (response_format, structured_outputs on both endpoints), tool calls (required, named, auto, streamed,
multi-turn) and the 400s, checked with parsers we did not write (json, jsonschema, re)."""

from __future__ import annotations

import json
import random
import re

import httpx
import pytest

from tests.server.conftest import assert_no_leak, live_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

ORDER = {"type": "object", "additionalProperties": False, "required": ["id", "status", "items", "customer"],
         "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                        "status": {"enum": ["open", "paid", "shipped"]},
                        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                  "items": {"type": "object", "additionalProperties": False,
                                            "required": ["sku", "qty"],
                                            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}},
                        "customer": {"type": "object", "additionalProperties": False, "required": ["name"],
                                     "properties": {"name": {"type": "string", "maxLength": 20}}}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["tz"],
                   "properties": {"tz": {"type": "string", "maxLength": 30}}}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live():
    with live_server(max_num_seqs=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_json_schema_outputs_validate(client) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    r = client.chat.completions.create(model="smollm2", n=2, seed=7, temperature=1.0, max_tokens=120,
                                       response_format=rf,
                                       messages=[{"role": "user", "content": "Make up an order as JSON."}])
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), ORDER)


def test_json_object(client) -> None:
    r = client.chat.completions.create(model="smollm2", seed=1, temperature=0.8, max_tokens=60,
                                       response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "A JSON object about a cat."}])
    c = r.choices[0]
    assert c.finish_reason == "length" or isinstance(json.loads(c.message.content), dict)


def test_regex_and_choice_on_completions(client) -> None:
    r = client.completions.create(model="smollm2", prompt="A product code:", max_tokens=20, temperature=1.0, seed=3,
                                  n=2, extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{3}"}})
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(model="smollm2", prompt="Is the sky blue?", max_tokens=5, temperature=1.0, seed=4,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no", "unsure"]}})
    assert r.choices[0].text in ("yes", "no", "unsure")


def _args(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_required_and_named_tool_calls(client) -> None:
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=120, temperature=0.7, seed=1)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, c.message
    for call in c.message.tool_calls:
        _args(call)
        assert call.id.startswith("call_") and call.type == "function"
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       parallel_tool_calls=False, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time" and _args(calls[0])


def test_streamed_tool_calls_assemble(client) -> None:
    stream = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                            max_tokens=120, temperature=0.7, seed=2, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        ch = chunk.choices[0]
        for d in ch.delta.tool_calls or []:
            if d.id:
                assert d.index not in calls and d.function.name   # id and name once, first
                calls[d.index] = {"name": d.function.name, "args": ""}
            calls[d.index]["args"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
    assert finish == "tool_calls" and calls
    for c in calls.values():
        jsonschema.validate(json.loads(c["args"]), SCHEMAS[c["name"]])


def test_multi_turn_with_a_tool_result(client) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp_c": 21, "sky": "clear"})}]
    r2 = client.chat.completions.create(model="smollm2", messages=msgs, tools=[WEATHER], tool_choice="none",
                                        max_tokens=30, temperature=0)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls


def test_auto_parses_the_model_s_own_calls(client) -> None:
    """tool_choice auto: whatever the model writes, content and calls come back apart; a hermes block it writes
    (forced here through structured_outputs, so the test does not depend on the model's choice) is a call."""
    block = r'<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "UTC"\}\}\n</tool_call>'
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice="auto",
                                       max_tokens=60, temperature=0, extra_body={"structured_outputs": {
                                           "regex": r"Let me check\. " + block}})
    m = r.choices[0].message
    assert m.content == "Let me check." and m.tool_calls[0].function.name == "get_time"
    assert json.loads(m.tool_calls[0].function.arguments) == {"tz": "UTC"}
    assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"json_schema": {}}}, "structured_outputs.json_schema"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
])
def test_bad_requests_are_400s(live, body, param) -> None:
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "smollm2", "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(live.url + "/health", timeout=30).status_code == 200


def test_fuzz_the_new_fields_never_5xx(live) -> None:
    rnd = random.Random(0)
    junk = [None, 0, -1, 1.5, "", "x" * 300, [], {}, [1, "a"], {"type": None}, {"json": []}, True, "\ud800"[:0]]
    fields = {"response_format": [{"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": 1}},
                                  {"type": "json_object", "extra": 1}],
              "structured_outputs": [{"regex": "("}, {"choice": []}, {"choice": [1]}, {"json": "{not json"},
                                     {"grammar": ""}, {"json_object": False}, {"json": {"type": "object"}}],
              "tools": [[{"type": "function"}], [{"type": "function", "function": {"name": "bad name"}}],
                        [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], [WEATHER]],
              "tool_choice": ["none", "auto", "required", "any", {"type": "function"}],
              "parallel_tool_calls": [False, "yes"]}
    for _ in range(40):
        body = {"model": "smollm2", "messages": ASK, "max_tokens": 4}
        for k in rnd.sample(sorted(fields), rnd.randint(1, 3)):
            body[k] = rnd.choice(fields[k] + junk)
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
    assert_no_leak(live)
