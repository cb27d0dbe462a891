"""server/tools.py without a server: tool_choice checks, the messages a chat template sees (native and the hermes
fallback), and the "required" / named grammars, which llguidance must accept and which must admit exactly the
calls the parameter schemas allow."""

from __future__ import annotations

import json

import pytest

from attnzoo.server.errors import APIError
from attnzoo.server.protocol import ChatRequest
from attnzoo.server.tools import template_messages, tool_constraint, tool_mode

llguidance = pytest.importorskip("llguidance")

F = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"],
    "additionalProperties": False}}}
G = {"type": "function", "function": {"name": "g"}}
TURNS = [{"role": "user", "content": "hi"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 3}'}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "42"}]


def _req(**kw) -> ChatRequest:
    return ChatRequest.model_validate({"messages": TURNS, **kw})


@pytest.mark.parametrize("kw, mode", [({}, "none"), ({"tools": [F]}, "auto"), ({"tools": [F], "tool_choice": "none"},
                                      "none"), ({"tools": [F], "tool_choice": "required"}, "required"),
                                      ({"tools": [F, G], "tool_choice": {"type": "function", "function": {"name": "g"}}},
                                       "named")])
def test_tool_mode(kw, mode) -> None:
    assert tool_mode(_req(**kw)) == mode


@pytest.mark.parametrize("kw", [{"tool_choice": "required"}, {"tools": [F], "tool_choice": "any"},
                                {"tools": [F], "tool_choice": {"type": "function", "function": {"name": "h"}}},
                                {"tools": [F, F]}])
def test_tool_mode_errors_name_the_field(kw) -> None:
    with pytest.raises(APIError) as e:
        tool_mode(_req(**kw))
    assert e.value.param in ("tool_choice", "tools")


def test_native_template_gets_tools_and_parsed_arguments() -> None:
    convo, tools = template_messages(_req(tools=[F]), ["hi", "", "42"], "{% for t in tools %}{% endfor %}")
    assert tools[0]["function"]["name"] == "f"
    assert convo[1]["tool_calls"][0]["function"]["arguments"] == {"x": 3}
    assert convo[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_fallback_puts_tools_calls_and_results_in_text() -> None:
    convo, tools = template_messages(_req(tools=[F]), ["hi", "", "42"], "{{ messages }}")
    assert tools is None and convo[0]["role"] == "system" and '"name": "f"' in convo[0]["content"]
    block = convo[2]["content"]
    assert block.startswith("<tool_call>\n") and json.loads(block.split("\n")[1]) == {"name": "f",
                                                                                      "arguments": {"x": 3}}
    assert convo[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}


@pytest.mark.parametrize("choice, parallel, ok, bad", [
    ("required", True, ['<tool_call>\n{"name":"f","arguments":{"x":3}}\n</tool_call>\n'
                        '<tool_call>\n{"name":"g","arguments":{}}\n</tool_call>'],
     ['<tool_call>\n{"name":"f","arguments":{"x":12}}\n</tool_call>', '<tool_call>\n{"name":"h","arguments":{}}\n'
      '</tool_call>', "hello"]),
    ({"type": "function", "function": {"name": "g"}}, True, ['<tool_call>\n{"name":"g","arguments":{}}\n</tool_call>'],
     ['<tool_call>\n{"name":"f","arguments":{"x":3}}\n</tool_call>']),
    ("required", False, ['<tool_call>\n{"name":"f","arguments":{"x":0}}\n</tool_call>'],
     ['<tool_call>\n{"name":"f","arguments":{"x":0}}\n</tool_call>\n<tool_call>\n{"name":"g","arguments":{}}\n'
      '</tool_call>']),
])
def test_forced_grammar_admits_exactly_the_valid_calls(choice, parallel, ok, bad) -> None:
    body = _req(tools=[F, G], tool_choice=choice, parallel_tool_calls=parallel)
    so = tool_constraint(body, tool_mode(body))
    from llguidance.gbnf_to_lark import any_to_lark
    grammar = llguidance.LLMatcher.grammar_from_lark(any_to_lark(so.grammar))
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    # byte-level check with a tokenizer of single bytes: does the grammar accept the whole text and end there?
    tok = llguidance.LLTokenizer(_byte_tokenizer_json(), eos_token=256)

    def accepts(text: str) -> bool:
        m = llguidance.LLMatcher(tok, grammar)
        return m.consume_tokens(list(text.encode())) and m.is_accepting()
    assert all(accepts(t) for t in ok) and not any(accepts(t) for t in bad)


def _byte_tokenizer_json() -> str:
    """A tokenizers JSON whose 256 byte tokens plus EOS make every text one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    order = sorted(alphabet, key=lambda c: _byte_of(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(order)} | {"<eos>": 256}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return tok.to_str()


def _byte_of(c: str) -> int:
    """GPT-2's byte-to-unicode map, inverted for one character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[c]


def test_chat_choice_parse_splits_reasoning_content_and_calls() -> None:
    """The chat endpoint's per-choice parser (reasoning first, then tool calls), whole and streamed in chunks."""
    import random

    from attnzoo.server.chat import _Parse
    from attnzoo.server.reasoning import get_reasoning_parser
    from attnzoo.server.tool_parsers import get_tool_parser
    text = ('<think>The user wants f.</think>\n\nLet me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 3}}\n'
            '</tool_call>')
    make = lambda: _Parse(get_reasoning_parser("qwen3"), get_tool_parser("hermes"))  # noqa: E731
    p = make()
    msg = p.message(text)
    assert msg["reasoning_content"] == "The user wants f." and msg["content"] == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == \
        [("f", {"x": 3})] and p.finish_reason("stop") == "tool_calls" and p.finish_reason("length") == "length"
    rnd = random.Random(0)
    for _ in range(20):
        cuts = sorted(rnd.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        s = make()
        deltas = [d for i, piece in enumerate(pieces) for d in s.deltas(piece, final=i == len(pieces) - 1)]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants f."
        assert "".join(d.get("content", "") for d in deltas) == "Let me check."
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert calls[0]["function"]["name"] == "f" and [c.get("id") is not None for c in calls].count(True) == 1
        assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"x": 3}
