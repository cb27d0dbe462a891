"""Hostile requests for the server's fuzz test and soak bench (one generator, used by both).

`cases(seed, count)` builds requests from valid bodies for every endpoint, then breaks them: wrong types,
huge and non-finite numbers (written as raw JSON: 1e400, NaN, 5000-digit integers), lone surrogates
(`\\ud800` escapes) in values and keys, long strings and lists, deep nesting, truncated or non-UTF-8 bytes,
wrong content types and methods. Accepted requests ask for at most a few tokens, so a run stays quick.
Each case carries `tags`: the hostile classes (`CLASSES`) it exercises, so a test can count what it covered.
`send` and `check` say what a correct server must answer: never a 5xx, every error in OpenAI's
envelope, every 200 stream ended by [DONE]."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

import httpx

from attnzoo.server import protocol

JSON = {"Content-Type": "application/json"}


@dataclass
class Case:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    label: str = ""          # what was done to the body, for failure messages
    chunked: bool = False    # send without Content-Length
    tags: frozenset[str] = frozenset()   # the hostile classes (CLASSES) in this case; none: a valid request


@dataclass
class Outcome:
    """One answer, without the body sent (a soak run keeps 10,000 of these)."""
    request: str             # method, path and what was done to the body
    status: int | None       # None: no answer within the timeout
    problems: list[str]
    seconds: float


class Raw:
    """JSON text written verbatim: what json.dumps cannot or will not produce."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:30]!r})"


def dumps(v: object, rng: random.Random | None = None) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return "{" + ",".join(f"{dumps(str(k), rng)}:{dumps(x, rng)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dumps(x, rng) for x in v) + "]"
    if isinstance(v, str) and rng is not None and rng.random() < 0.5:
        try:
            v.encode("utf-8")
            return json.dumps(v, ensure_ascii=False)       # raw UTF-8 bytes rather than \u escapes
        except UnicodeEncodeError:
            pass
    return json.dumps(v)                                    # a lone surrogate becomes the escape \ud800


# ---- hostile values -------------------------------------------------------------------------------
BAD_TEXT = ["\ud800", "a\udfffb", "\udc80" * 3, "ok\ud83d"]          # lone surrogates: not valid Unicode
RAW_NUMBERS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e-400", "-0", "1" + "0" * 400,
               "-" + "9" * 400, "1" + "0" * 5000, "1.5e308", "9223372036854775808", "18446744073709551616"]


def hostile(rng: random.Random, depth: int = 0) -> object:
    """A value no field expects (or expects only at its edges)."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(["", "x", "hello", "1", "1e400", "NaN", "true", "null", "1" + "0" * 400, "日本語 🙂"])
    if kind == 1:
        return rng.choice([True, False, None, 0, -1, 1, 2, 3.5, -0.5, 1e308])
    if kind == 2:
        return rng.choice([10**19, 10**30, 10**400, -(10**400), 2**63, 2**63 - 1, 2**64, -(2**63) - 1])
    if kind == 3:
        return Raw(rng.choice(RAW_NUMBERS))
    if kind == 4:
        return rng.choice(BAD_TEXT)
    if kind == 5:
        return "a" * rng.choice([300, 5_000, 100_000])
    if kind == 6:
        return [rng.choice([1, "s", None, 10**400]) for _ in range(rng.choice([0, 1, 3, 200, 2000]))]
    if kind == 7:
        return {rng.choice(["a", "type", "\ud800", "text", ""]): hostile(rng, depth + 1) if depth < 2 else 1}
    if kind == 8:
        d = rng.choice([50, 5_000, 50_000])
        return Raw("[" * d + "]" * d if rng.random() < 0.5 else '{"a":' * d + "1" + "}" * d)
    if kind == 9:
        return [hostile(rng, depth + 1) for _ in range(3)] if depth < 2 else []
    if kind == 10:
        return rng.choice([[1, 2], [[1], [2]], ["a", 1], [[]], [], [-1], [10**7], [True], [1.0]])
    return rng.choice(BAD_TEXT + ["\x00", "\ufffe", "\U0010ffff"])


def _budget(rng: random.Random) -> object:
    """A token budget: valid ones are tiny, so accepted requests stay cheap."""
    return rng.choice([0, -1, 1, 2, 3, 10**400, 2**63, 10**6, "2", 2.5, True, Raw("NaN"), Raw("1e400")])


# ---- valid bodies and how each field can go wrong ------------------------------------------------
SAMPLING = {
    "n": lambda r: r.choice([0, -1, 1, 2, 3, 128, 129, 10**6, 10**400, "2", 2.0, True, Raw("1" + "0" * 400)]),
    "temperature": lambda r: r.choice([0, 0.7, 1e308, -1, Raw("NaN"), Raw("1e400"), "hot", None]),
    "top_p": lambda r: r.choice([0, 0.5, 1, 2, Raw("NaN"), None]),
    "top_k": lambda r: r.choice([-2, -1, 0, 1, 40, 49153, 10**30, 2**63, 10**400, "5"]),
    "min_p": lambda r: r.choice([0, 0.1, 1.5, -1, Raw("-Infinity")]),
    "seed": lambda r: r.choice([0, 1, -1, 2**63 - 1, 2**63, -(2**63), 10**30, 10**400, "7", 1.5]),
    "stop": lambda r: r.choice(["\n", "", ["a", "b"], ["x"] * 17, ["x" * 300], [1], "\ud800", ["ok", "\udc00"],
                                [""], None, {"a": 1}]),
    "stop_token_ids": lambda r: r.choice([[2], [-1], [10**7], [10**400], list(range(300)), ["1"], [True], 5]),
    "presence_penalty": lambda r: r.choice([0, 2, 2.5, -3, Raw("Infinity")]),
    "frequency_penalty": lambda r: r.choice([0, 1, -2.5, "1"]),
    "repetition_penalty": lambda r: r.choice([1, 1.2, 0, -1, 1e-300, 1e300, Raw("NaN")]),
    "min_tokens": lambda r: r.choice([0, 1, 5, -1, 10**400]),
    "ignore_eos": lambda r: r.choice([True, False, "yes", 1]),
    "logit_bias": lambda r: r.choice([{}, {"1": 5}, {"\ud800": 1}, [1], {"1": Raw("NaN")}]),
    "stream": lambda r: r.choice([True, False, "true", 1, None]),
    "stream_options": lambda r: r.choice([{"include_usage": True}, {"include_usage": "yes"}, [], None]),
    "user": lambda r: r.choice(["u", "\ud800", 5, "u" * 5000]),
    "model": lambda r: r.choice(["smollm2", "gpt-4", "\ud800", "", 5, None, "m" * 10_000]),
    "max_tokens": _budget,
}
COMPLETION = {
    "prompt": lambda r: r.choice([
        "Hello", "", "\ud800", ["a", "\udc00"], [1, 2, 3], [10**7], [-1], [10**400], [[1, 2], [3]], [[]], [],
        ["p"] * 65, ["p"] * 3, [[1]] * 65, [1.5], [True], "x" * 700_000, "word " * 20_000, {"a": 1}, None, 5,
        [["a"]], ["日本語", "🙂"]]),
    "logprobs": lambda r: r.choice([0, 1, 5, 20, 21, -1, 10**400, True, "2"]),
    "echo": lambda r: r.choice([False, True, "no"]),
    "suffix": lambda r: r.choice([None, "", "s", 5]),
    "best_of": lambda r: r.choice([1, 2, 0, 129, 10**400, None]),
}
CHAT = {
    "messages": lambda r: r.choice([
        [], "hi", [1], [{"role": "user"}], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
        [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
        [{"role": "user", "content": [{"type": "text"}] * 200}], [{"role": "user", "content": "hi"}] * 1100,
        [{"role": "user", "content": "x" * 700_000}], [{"role": "user", "content": None}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [{"ro\ud800le": "user", "content": "hi"}], [{"role": "user", "content": "日本語 🙂"}]]),
    "max_completion_tokens": _budget,
    "logprobs": lambda r: r.choice([True, False, 1, "true"]),
    "top_logprobs": lambda r: r.choice([0, 2, 20, 21, -1, 10**400, "3"]),
    "add_generation_prompt": lambda r: r.choice([True, False, "no"]),
}
TOKENIZE = {
    "prompt": lambda r: r.choice(["hello", "\ud800", "", 5, ["a"], "x" * 100_000, None]),
    "messages": lambda r: CHAT["messages"](r),
    "add_generation_prompt": lambda r: r.choice([True, 0]),
    "model": SAMPLING["model"],
}
DETOKENIZE = {
    "tokens": lambda r: r.choice([[1, 2], [], [-1], [10**7], [10**400], ["1"], [1.5], [True], 5, None,
                                  list(range(5000)), [Raw("NaN")]]),
    "model": SAMPLING["model"],
}


# ---- what a case exercises ---------------------------------------------------------------------
CLASSES = (
    # the request line and headers
    "unknown-path", "wrong-method", "bad-query", "bad-content-type", "oversized-body", "chunked",
    # fields: a required one missing, an unknown key, a value of the wrong JSON type, and what values hold
    # (anywhere, keys included)
    "missing-field", "unknown-key", "wrong-type", "lone-surrogate", "non-finite-number", "huge-number",
    "long-value", "deep-nesting",
    # the bytes themselves (_corrupt)
    "truncated", "invalid-utf8", "random-bytes", "empty-body", "bom", "not-an-object", "unbalanced",
)
REQUIRED = {"/v1/completions": ("prompt",), "/v1/chat/completions": ("messages",), "/detokenize": ("tokens",),
            "/tokenize": ("prompt", "messages")}    # the body must have one of these
ROUTES = {"GET": {"/v1/models", "/health", "/metrics", "/"},
          "POST": {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}}
# Fields whose type a validator checks (typed Any in the request models' schemas): the JSON types they take.
VALIDATED = {"prompt": "array string", "stop": "array null string", "tool_choice": "null object string"}


def _field_types(model: type[protocol.BaseModel]) -> dict[str, str]:
    """The JSON types each field of a request model takes, read from its schema ("number" takes integers too).
    Only tags depend on this, never what a correct server must answer."""
    out = {}
    for name, s in model.model_json_schema()["properties"].items():
        types = {"object" if "$ref" in o else o.get("type") for o in s.get("anyOf", [s])} - {None}
        out[name] = " ".join(sorted(types)) if types else VALIDATED[name]
    return out


FIELD_TYPES = {"/v1/completions": _field_types(protocol.CompletionRequest),
               "/v1/chat/completions": _field_types(protocol.ChatRequest),
               "/tokenize": _field_types(protocol.TokenizeRequest),
               "/detokenize": _field_types(protocol.DetokenizeRequest)}
_NON_FINITE = {"NaN", "Infinity", "-Infinity", "1e400", "-1e400"}


def json_type(v: object) -> str:
    if isinstance(v, Raw):
        t = v.text.lstrip("-")
        return "array" if t[:1] == "[" else "object" if t[:1] == "{" else "integer" if t.isdigit() else "number"
    if v is None or isinstance(v, bool):
        return "null" if v is None else "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}[type(v)]


def wrong_type(path: str, name: str, v: object) -> bool:
    want = FIELD_TYPES[path].get(name)
    if want is None:
        return False
    got, types = json_type(v), want.split()
    return got not in types and not (got == "integer" and "number" in types)


def value_tags(v: object, into: set[str]) -> None:
    """Add the hostile classes `v` holds anywhere (keys included) to `into`."""
    if isinstance(v, Raw):
        t = v.text.lstrip("-")
        if t[:1] in ("[", "{"):
            into.add("deep-nesting")
        elif v.text in _NON_FINITE:
            into.add("non-finite-number")
        elif t.isdigit() and len(t) > 18:
            into.add("huge-number")
    elif isinstance(v, bool) or v is None:
        pass
    elif isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            into.add("huge-number")
    elif isinstance(v, float):
        if abs(v) >= 1e300:
            into.add("huge-number")
    elif isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            into.add("lone-surrogate")
        if len(v) >= 1000:
            into.add("long-value")
    elif isinstance(v, list):
        if len(v) >= 200:
            into.add("long-value")
        for x in v:
            value_tags(x, into)
    elif isinstance(v, dict):
        for k, x in v.items():
            value_tags(k, into)
            value_tags(x, into)


def field_tags(path: str, body: dict, edited: Iterable[str]) -> set[str]:
    """The classes a body about to be sent holds (tagged from the final body: a later edit may undo an earlier
    one); `edited`: the known fields that were given new values."""
    tags = {"wrong-type"} if any(n in body and wrong_type(path, n, body[n]) for n in edited) else set()
    tags |= {"missing-field"} if all(body.get(n) is None for n in REQUIRED[path]) else set()
    value_tags(body, tags)
    return tags


def _base(path: str, model: str) -> tuple[dict, dict]:
    if path == "/v1/completions":
        return {"model": model, "prompt": "Hello", "max_tokens": 2}, {**SAMPLING, **COMPLETION}
    if path == "/v1/chat/completions":
        return ({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                {**SAMPLING, **CHAT})
    if path == "/tokenize":
        return {"prompt": "hello world"}, TOKENIZE
    return {"tokens": [1, 2, 3]}, DETOKENIZE


def _corrupt(rng: random.Random, data: bytes) -> tuple[bytes, str, str, bool]:
    """Break the bytes themselves: (bytes, label, class, whether the body was replaced whole)."""
    kind = rng.randrange(7)
    if kind == 0:
        cut = rng.randrange(max(1, len(data)))
        return data[:cut], f"truncated at {cut}", "truncated", False
    if kind == 1:
        at = rng.randrange(len(data) + 1)
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf4\x90\x80\x80"])
        return data[:at] + bad + data[at:], f"invalid UTF-8 {bad!r} at {at}", "invalid-utf8", False
    if kind == 2:
        data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 17, 300])))
        return data, "random bytes", "random-bytes", True
    if kind == 3:
        return rng.choice([b"", b" ", b"\n"]), "empty", "empty-body", True
    if kind == 4:
        return b"\xef\xbb\xbf" + data, "UTF-8 BOM", "bom", False     # valid: a BOM is accepted
    if kind == 5:
        data = rng.choice([b"[]", b"null", b"1", b'"s"', b"true", b"{}", b"[{}]"])
        return data, "not an object", "not-an-object", True
    return data.replace(b"}", b"", 1), "unbalanced", "unbalanced", False


def _case(rng: random.Random, model: str) -> Case:
    roll = rng.random()
    if roll < 0.06:
        path = rng.choice(["/v1/models", "/health", "/metrics", "/", "/nope", "/v1/models/x", "/v1/completions"])
        query = rng.choice(["", "?a=1", "?\xff=%ff"])
        tags = set() if path in ROUTES["GET"] else {"wrong-method"} if path in ROUTES["POST"] else {"unknown-path"}
        tags |= {"bad-query"} if "\xff" in query else set()
        return Case("GET", path + query, None, {}, "GET", tags=frozenset(tags))
    if roll < 0.09:
        return Case(rng.choice(["PUT", "DELETE", "PATCH"]), rng.choice(["/v1/completions", "/health"]), b"{}",
                    label="wrong method", tags=frozenset({"wrong-method"}))
    path = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/completions", "/v1/chat/completions",
                       "/tokenize", "/detokenize"])
    body, mutators = _base(path, model)
    labels: list[str] = []
    edited: set[str] = set()
    tags: set[str] = set()
    if rng.random() < 0.15:
        body["stream"] = True
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        op = rng.random()
        name = rng.choice(sorted(mutators))
        if op < 0.75:
            body[name] = mutators[name](rng)
            labels.append(f"{name}={body[name]!r:.60}")
            edited.add(name)
        elif op < 0.85:
            body.pop(name, None)
            labels.append(f"-{name}")
        else:
            key = rng.choice(["extra", "\ud800", "x" * 300, "messages.0", ""])
            body[key] = hostile(rng)
            labels.append(f"{key!r:.20}={body[key]!r:.40}")
            tags.add("unknown-key")
    if path == "/v1/chat/completions" and body.get("max_tokens") is None and "max_completion_tokens" not in body:
        body["max_tokens"] = 2     # chat's default budget is the whole context: keep accepted requests cheap
    tags |= field_tags(path, body, edited)
    data = dumps(body, rng).encode("utf-8")
    headers = dict(JSON)
    roll = rng.random()
    if roll < 0.15:
        data, what, kind, replaced = _corrupt(rng, data)
        labels.append(what)
        tags = {kind} if replaced else tags | {kind}
    elif roll < 0.2:
        ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None,
                            "application/json; charset=utf-8", "application/vnd.api+json"])
        headers = {} if ctype is None else {"Content-Type": ctype}
        labels.append(f"content-type {ctype}")
        tags |= {"bad-content-type"} if ctype is not None and "json" not in ctype else set()
    elif roll < 0.205:
        data = b'{"prompt": "' + b"a" * (3 << 20) + b'"}'
        labels.append("3 MB body")
        tags = {"oversized-body"}
    chunked = rng.random() < 0.05
    tags |= {"chunked"} if chunked else set()
    return Case("POST", path, data, headers, "; ".join(labels) or "valid", chunked=chunked, tags=frozenset(tags))


def cases(seed: int, count: int, model: str = "smollm2") -> Iterator[Case]:
    """`count` cases, made as they are consumed (a soak run never holds them all)."""
    rng = random.Random(seed)
    return (_case(rng, model) for _ in range(count))


# ---- sending and judging -------------------------------------------------------------------------
def check(status: int, content_type: str, content: bytes) -> list[str]:
    """What is wrong with one answer (empty: nothing)."""
    if status >= 500:
        return [f"HTTP {status}: {content[:300]!r}"]
    if status >= 400:
        try:
            err = json.loads(content)["error"]
            if set(err) != {"message", "type", "param", "code"} or not isinstance(err["message"], str) \
                    or not err["message"]:
                return [f"HTTP {status}: not OpenAI's envelope: {content[:300]!r}"]
        except (ValueError, KeyError, TypeError):
            return [f"HTTP {status}: not JSON in OpenAI's envelope: {content[:300]!r}"]
        return []
    if content_type.startswith("text/event-stream"):
        events = [ln[6:] for ln in content.decode("utf-8", "replace").splitlines() if ln.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return [f"stream did not end with [DONE]: {content[-300:]!r}"]
        if any('"error"' in e and e.startswith('{"error"') for e in events):
            return [f"error event in a stream: {content[-300:]!r}"]
        return []
    if content_type.startswith("application/json"):
        try:
            json.loads(content)
        except ValueError:
            return [f"HTTP {status}: body is not JSON: {content[:300]!r}"]
    return []


async def send(client: httpx.AsyncClient, case: Case, timeout: float = 60.0) -> Outcome:
    t0 = time.perf_counter()
    what = f"{case.method} {case.path} [{case.label}]"
    content: bytes | AsyncIterator[bytes] | None = case.body
    if case.chunked and case.body is not None:
        async def chunks(b: bytes = case.body):
            for i in range(0, len(b), 4096):
                yield b[i:i + 4096]
        content = chunks()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream(case.method, case.path, content=content, headers=case.headers) as r:
                body = await r.aread()
        problems = check(r.status_code, r.headers.get("content-type", ""), body)
        return Outcome(what, r.status_code, problems, time.perf_counter() - t0)
    except TimeoutError:
        return Outcome(what, None, [f"no answer within {timeout:.0f} s"], time.perf_counter() - t0)
    except httpx.HTTPError as e:
        return Outcome(what, None, [f"{type(e).__name__}: {e}"], time.perf_counter() - t0)


async def run(base_url: str, todo: Iterable[Case], concurrency: int = 8, timeout: float = 60.0,
              headers: dict[str, str] | None = None) -> list[Outcome]:
    """Send every case, `concurrency` at a time (outcomes in completion order)."""
    todo, outcomes = iter(todo), []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, headers=headers or {}) as c:
        async def worker() -> None:
            for case in todo:          # shared: each worker takes the next case when it is free
                outcomes.append(await send(c, case, timeout))
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return outcomes


def describe(o: Outcome) -> str:
    return f"{o.request} -> {o.status}: {'; '.join(o.problems)}"
