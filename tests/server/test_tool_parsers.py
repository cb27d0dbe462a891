"""Tool-call parsers: whole texts against the values they were rendered from, and streams cut anywhere
against `parse` of the same text."""

from __future__ import annotations

import json
import random

import pytest

from attnzoo.server.tool_parsers import (
    TOOL_PARSERS, ToolCallDelta, detect_tool_parser, get_tool_parser, new_call_id)

FORMATS = ["hermes", "llama3_json", "deepseek_v3", "kimi_k2", "glm45", "minimax"]
JSON_ARGS = {"hermes", "llama3_json", "deepseek_v3", "kimi_k2"}   # arguments are the model's own JSON text
SECTIONED = {"llama3_json", "deepseek_v3", "kimi_k2", "minimax"}

# Strings that look like the start of a marker, inside argument values: the stream must hold them, not end there.
TRICKY = ["Paris", 'a "quoted" word', "back\\slash", "{braces}", "[x]", "é ü 中", "</tool", "<|tool_call",
          "<｜tool▁call", "```", "line\nbreak", "a < b"]
CONTENT = ["Hi", " ", "\n", "<", "<too", "{", "}", "é", "a < b", "<|", "<｜tool", "ok."]


def render_call(fmt: str, name: str, args: dict, args_text: str, i: int) -> str:
    if fmt == "hermes":
        return f'<tool_call>\n{{"name": "{name}", "arguments": {args_text}}}\n</tool_call>'
    if fmt == "llama3_json":
        return f'{{"name": "{name}", "parameters": {args_text}}}'
    if fmt == "deepseek_v3":
        return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args_text}\n```<｜tool▁call▁end｜>"
    if fmt == "kimi_k2":
        return f"<|tool_call_begin|>functions.{name}:{i}<|tool_call_argument_begin|>{args_text}<|tool_call_end|>"
    raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in args.items()}
    if fmt == "glm45":
        pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in raw.items())
        return f"<tool_call>{name}\n{pairs}</tool_call>"
    params = "".join(f'<parameter name="{k}">{v}</parameter>\n' for k, v in raw.items())
    return f'<invoke name="{name}">\n{params}</invoke>\n'


def render(fmt: str, before: str, calls: list[tuple[str, dict, str]], after: str, sep: str = "\n") -> str:
    """A model output: content, the calls in `fmt`, more content (the calls' section, if any, in between)."""
    if not calls:
        return before + after
    blocks = [render_call(fmt, n, a, t, i) for i, (n, a, t) in enumerate(calls)]
    if fmt == "hermes" or fmt == "glm45":
        return before + sep.join(blocks) + after
    if fmt == "llama3_json":   # runs to the end of the output
        return (before + "<|python_tag|>" if before else "") + "; ".join(blocks)
    opens, closes = {"deepseek_v3": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
                     "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
                     "minimax": ("<minimax:tool_call>\n", "</minimax:tool_call>")}[fmt]
    return before + opens + "".join(blocks) + closes + after


def random_args(rng: random.Random, fmt: str) -> tuple[dict, str]:
    def value(depth: int):
        kind = rng.randrange(5 if depth < 2 else 3)
        if kind == 0:
            return rng.randint(-1000, 1000)
        if kind == 1 or fmt not in JSON_ARGS:
            return "s_" + rng.choice(TRICKY) if fmt not in JSON_ARGS else rng.choice(TRICKY)
        if kind == 2:
            return rng.choice([True, None, 2.5])
        if kind == 3:
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        return {f"k{j}": value(depth + 1) for j in range(rng.randrange(3))}
    args = {f"p{j}": value(0) for j in range(rng.randrange(4))}
    if fmt not in JSON_ARGS:
        return args, ""
    sep = rng.choice([(", ", ": "), (",", ":")])
    return args, json.dumps(args, ensure_ascii=rng.random() < 0.5, separators=sep, indent=rng.choice([None, 2]))


def random_output(rng: random.Random, fmt: str):
    before = "".join(rng.choice(CONTENT) for _ in range(rng.randrange(6)))
    before = ("Hi " + before) if before or fmt != "llama3_json" or rng.random() < 0.5 else ""
    calls = [(f"fn_{rng.randrange(99)}", *random_args(rng, fmt)) for _ in range(rng.randrange(4))]
    after = "" if fmt == "llama3_json" else "".join(rng.choice(CONTENT) for _ in range(rng.randrange(4)))
    text = render(fmt, before, calls, after)
    return text, before, calls, after


def stream(fmt: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Feed `pieces`, check the deltas are well formed, and join them into (content, [(name, arguments)])."""
    p = get_tool_parser(fmt)()
    content, deltas = [], []
    for piece in [*pieces, None]:
        c, d = p.feed(piece) if piece is not None else p.finish()
        content.append(c)
        deltas += d
    calls: list[list[str]] = []
    for d in deltas:
        if d.index == len(calls):   # a new call: its first piece carries id and name
            assert d.id and d.id.startswith("call_") and d.name is not None
            calls.append([d.name, d.arguments])
        else:
            assert d.index == len(calls) - 1 and d.id is None and d.name is None
            calls[-1][1] += d.arguments
    return "".join(content), [tuple(c) for c in calls]


def parsed(fmt: str, text: str) -> tuple[str, list[tuple[str, str]]]:
    content, calls = get_tool_parser(fmt)().parse(text)
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    return content, [(c.name, c.arguments) for c in calls]


def check_streams(fmt: str, text: str, rng: random.Random) -> None:
    want = parsed(fmt, text)
    for i in range(len(text) + 1):
        assert stream(fmt, [text[:i], text[i:]]) == want, (i, text)
    assert stream(fmt, list(text)) == want
    for _ in range(3):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 12))))
        assert stream(fmt, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]) == want


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", range(4))
def test_random_outputs(fmt: str, seed: int) -> None:
    rng = random.Random(seed * 1000 + FORMATS.index(fmt))
    for _ in range(3):
        text, before, calls, after = random_output(rng, fmt)
        content, got = parsed(fmt, text)
        if not calls:
            assert (content, got) == (text, [])
        else:
            sep = "\n" * (len(calls) - 1) if fmt in ("hermes", "glm45") else ""
            assert content == (before + sep + after).strip()
            assert [n for n, _ in got] == [n for n, _, _ in calls]
            for (_, args), (_, want, want_text) in zip(got, calls):
                assert args == want_text if fmt in JSON_ARGS else json.loads(args) == want
        check_streams(fmt, text, rng)


EXAMPLES = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                   '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "kimi_k2": "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
               '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>',
    "glm45": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
    "minimax": '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
               "</invoke>\n</minimax:tool_call>",
}
# Broken before the name is complete: content, in parse and in every stream.
BROKEN = {
    "hermes": "<tool_call>\nnot json\n</tool_call>",
    "llama3_json": '{"foo": 1}',
    "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n[1]\n```"
                   "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "kimi_k2": "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>nope"
               "<|tool_call_end|><|tool_calls_section_end|>",
    "glm45": "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
    "minimax": "<minimax:tool_call>\n<invoke name=>\n</invoke>\n</minimax:tool_call>",
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_examples(fmt: str) -> None:
    rng = random.Random(7)
    one = EXAMPLES[fmt]
    content, calls = parsed(fmt, one)
    assert content == "" and [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": "Paris"})]
    before = "Sure, let me look.\n\n<|python_tag|>" if fmt == "llama3_json" else "Sure, let me look.\n\n"
    assert parsed(fmt, before + one) == ("Sure, let me look.", calls)
    for text in [one, before + one, "The weather is fine <toy> a < b {x}", "", BROKEN[fmt], "Well: " + BROKEN[fmt]]:
        check_streams(fmt, text, rng)
    assert get_tool_parser(fmt)().parse(BROKEN[fmt]) == (BROKEN[fmt], [])
    assert get_tool_parser(fmt)().parse("no call here") == ("no call here", [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_calls(fmt: str) -> None:
    calls = [("a", {"x": 1}, '{"x": 1}'), ("b", {"y": [1, 2]}, '{"y": [1, 2]}')]
    content, got = parsed(fmt, render(fmt, "", calls, ""))
    assert content == "" and [(n, json.loads(a)) for n, a in got] == [("a", {"x": 1}), ("b", {"y": [1, 2]})]


@pytest.mark.parametrize("fmt", sorted(SECTIONED - {"llama3_json"}))
def test_broken_call_beside_a_good_one_is_content(fmt: str) -> None:
    good = EXAMPLES[fmt]
    inner = {"deepseek_v3": "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n[1]\n```<｜tool▁call▁end｜>",
             "kimi_k2": "<|tool_call_begin|>functions.f:1<|tool_call_argument_begin|>nope<|tool_call_end|>",
             "minimax": "<invoke name=>\n</invoke>\n"}[fmt]
    opens, close = {"deepseek_v3": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
                    "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
                    "minimax": ("<minimax:tool_call>\n", "</minimax:tool_call>")}[fmt]
    for text in [good.replace(close, inner + close), good.replace(opens, opens + inner)]:
        content, calls = parsed(fmt, text)
        assert content == inner.strip() and [n for n, _ in calls] == ["get_weather"]
        check_streams(fmt, text, random.Random(3))


def test_hermes_extras() -> None:
    # arguments before name, a string holding JSON, "parameters": still calls, read whole at the close
    text = ('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'
            '<tool_call>{"name": "g", "arguments": "{\\"b\\": 2}"}</tool_call>'
            '<tool_call>{"name": "h", "parameters": {}}</tool_call>')
    content, calls = parsed("hermes", text)
    assert content == "" and [(n, json.loads(a)) for n, a in calls] == [("f", {"a": 1}), ("g", {"b": 2}), ("h", {})]
    check_streams("hermes", text, random.Random(1))
    # no closing tag at the end of the output: a call when it parses
    assert parsed("hermes", '<tool_call>{"name": "f", "arguments": {}}') == ("", [("f", "{}")])


def test_deepseek_v31_and_kimi_spacing() -> None:
    text = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"tz":"UTC"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    assert parsed("deepseek_v31", text) == ("", [("get_time", '{"tz":"UTC"}')])
    text = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get.weather:3 <|tool_call_argument_begin|>\n'
            '{"a": 1}<|tool_call_end|><|tool_calls_section_end|>')
    assert parsed("kimi_k2", text) == ("", [("get.weather", '{"a": 1}')])


def test_xml_values() -> None:
    text = ("<tool_call>f\n<arg_key>n</arg_key><arg_value>12</arg_value><arg_key>s</arg_key><arg_value>twelve"
            "</arg_value><arg_key>o</arg_key><arg_value>{\"a\": [1]}</arg_value><arg_key>x</arg_key>"
            "<arg_value>NaN</arg_value></tool_call>")
    _, [(name, args)] = parsed("glm45", text)
    assert name == "f" and json.loads(args) == {"n": 12, "s": "twelve", "o": {"a": [1]}, "x": "NaN"}


def test_stream_sends_name_and_arguments_before_the_close() -> None:
    p = get_tool_parser("hermes")()
    c, d = p.feed('Look.<tool_call>\n{"name": "f", "arguments": {"q": "a</tool')
    assert c == "Look." and d[0].name == "f" and d[0].id and "".join(x.arguments for x in d) == '{"q": "a'
    c, d = p.feed('_x"}}\n</tool_call>')
    assert c == "" and "".join(x.arguments for x in d) == '</tool_x"}' and d[0].id is None
    assert p.finish() == ("", [])


def test_held_back_prefix_is_released_never_lost() -> None:
    p = get_tool_parser("hermes")()
    assert p.feed("a <") == ("a", [])         # "<" may open <tool_call>; the space waits with it
    assert p.feed("tool") == ("", [])
    assert p.feed("y b") == (" <tooly b", [])
    assert p.feed(" <tool_ca") == ("", [])
    assert p.finish() == (" <tool_ca", [])
    p = get_tool_parser("hermes")()
    assert p.feed("a < b") == ("a < b", [])
    assert p.feed("<toy") == ("<toy", [])


def test_broken_after_name_in_a_stream() -> None:
    # Documented: once the name went out the call stands with the arguments sent; parse keeps the block as content.
    text = '<tool_call>{"name": "f", "arguments": {"a": 1, }}</tool_call>'
    assert parsed("hermes", text) == (text, [])
    assert stream("hermes", list(text)) == ("", [("f", '{"a": 1, }')])


def test_delta_to_openai() -> None:
    assert ToolCallDelta(0, "call_x", "f", "{").to_openai() == {
        "index": 0, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{"}}
    assert ToolCallDelta(1, arguments="}").to_openai() == {"index": 1, "function": {"arguments": "}"}}
    ids = {new_call_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 29 and i[5:].isalnum() for i in ids)


def test_registry_and_detection() -> None:
    assert set(FORMATS) <= set(TOOL_PARSERS)
    assert all(get_tool_parser(n) is TOOL_PARSERS[n] for n in TOOL_PARSERS)
    with pytest.raises(ValueError, match="hermes.*llama3_json"):
        get_tool_parser("nope")
    for marker, want in [("{{ '<tool_call>' }}", "hermes"), ("<|python_tag|>", "llama3_json"),
                         ("role == 'ipython'", "llama3_json"), ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
                         ("<|tool_calls_section_begin|>", "kimi_k2"), ("<tool_call>{{ n }}<arg_key>", "glm45"),
                         ("<minimax:tool_call>", "minimax")]:
        assert detect_tool_parser("x " + marker + " y") == want
    assert detect_tool_parser(None) == detect_tool_parser("plain") == "hermes"
    assert detect_tool_parser(None, "LlamaForCausalLM") == "llama3_json"
