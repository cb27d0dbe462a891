"""Tool calls in a model's own output format, for tool_choice "auto": whole texts (`parse`) and streams (`feed`).

Formats, by vLLM's --tool-call-parser names:
  hermes       <tool_call>{"name": N, "arguments": {...}}</tool_call>, once per call (Qwen2.5/3, SmolLM, Hermes)
  llama3_json  {"name": N, "parameters": {...}}; {...}: the whole output, or what follows <|python_tag|>
  deepseek_v3  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>N\\n```json\\n{...}\\n```<｜tool▁call▁end｜>
               ...<｜tool▁calls▁end｜>; V3.1's `<｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}` is read too
  kimi_k2      <|tool_calls_section_begin|><|tool_call_begin|>functions.N:0<|tool_call_argument_begin|>{...}
               <|tool_call_end|>...<|tool_calls_section_end|>
  glm45        <tool_call>N\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>...</tool_call>
  minimax      <minimax:tool_call>\\n<invoke name="N">\\n<parameter name="k">v</parameter>\\n</invoke>\\n</minimax:tool_call>
In glm45 and minimax a value that reads as JSON is kept as JSON, anything else is a string.

One machine serves both: `parse(text)` is `feed(text)` + `finish()` on a fresh parser, so a stream cut
anywhere yields what the whole text does. The stream never takes back what it sent: content that could
still be the start of a marker ("<tool") is held until decided, and once there are calls the content
loses the whitespace at its two ends (held until later content shows where it is). A call's name goes out (with its id) once complete; JSON
arguments then go out as they arrive, as the model's own text, so the pieces join to exactly `arguments`;
glm45/minimax arguments go out when the call closes. A call that does not parse when it closes is kept as
content, and a section (deepseek_v3, kimi_k2, minimax, llama3_json) without one good call stays content
whole, markers included. Only a stream can do worse: when a call breaks after its name went out (invalid
JSON at the close), the call stands with the arguments already sent and the rest of its block is dropped.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import ClassVar

_ALNUM = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str   # JSON text of the arguments object


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None     # on a call's first piece only, with its name
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        d: dict = {"index": self.index}
        if self.id is not None:
            d.update(id=self.id, type="function")
        fn = {"name": self.name} if self.name is not None else {}
        d["function"] = {**fn, "arguments": self.arguments}
        return d


def _partial(s: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `s` that could still grow into one of `markers`."""
    for k in range(min(len(s), max((len(m) for m in markers), default=1) - 1), 0, -1):
        if any(m.startswith(s[-k:]) for m in markers):
            return k
    return 0


class _Scan:
    """Finds where a JSON object or array ends in text that grows piece by piece (resumes where it stopped)."""

    def __init__(self, start: int):
        self.pos, self.depth, self.in_str, self.esc, self.end = start, 0, False, False, None

    def run(self, s: str) -> int | None:
        """The end (exclusive) once the value's closing bracket is in `s`, else None."""
        for k in range(self.pos, len(s) if self.end is None else self.pos):
            c = s[k]
            if self.in_str:
                self.esc, self.in_str = (False, True) if self.esc else (c == "\\", c != '"')
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = k + 1
                    break
        self.pos = self.end if self.end is not None else len(s)
        return self.end


def _no_constant(c: str):
    raise ValueError(c)   # NaN/Infinity are not JSON


def _loads(s: str, default=None):
    try:
        return json.loads(s, parse_constant=_no_constant)
    except ValueError:
        return default


class ToolParser:
    """The shared machine: content, then sections (optional) holding calls between open and close markers."""
    name: ClassVar[str]
    section: ClassVar[tuple[str, str | None] | None] = None   # markers around a group of calls
    call_open: ClassVar[str]
    call_close: ClassVar[str]
    stream_args: ClassVar[bool] = True   # the arguments are JSON text in the output, sent as they arrive

    def __init__(self) -> None:
        self._buf = ""                     # text not yet decided
        self._state = "out"                # "out" | "section" | "call"
        self._ws, self._called, self._fresh = "", False, True   # held whitespace; any call yet; any content yet
        self._index = 0                    # the next call's index
        self._sec_raw: str | None = None   # a section's text while it has no named call (it may stay content)
        self._sec_bad: list[str] = []      # broken calls of that section, content if a later call is named
        self._start_call("")
        self._state = "out"

    def _head(self, body: str) -> tuple[str, int] | None:
        """The name and where the streamed arguments start, once both are certain from a prefix of the body."""
        return None

    def _call(self, body: str) -> tuple[str, str] | None:
        """A whole call body as (name, arguments JSON text), or None when malformed."""
        raise NotImplementedError

    def _close(self, body: str) -> tuple[int, int] | None:
        """Where the body ends and its close marker ends, once the marker is in."""
        i = body.find(self.call_close)
        return None if i < 0 else (i, i + len(self.call_close))

    def _find_open(self, buf: str) -> tuple[int, int, bool] | None:
        """Start and end of the first opening marker outside calls, and whether it opens a section."""
        i = buf.find(marker := self.section[0] if self.section else self.call_open)
        return None if i < 0 else (i, i + len(marker), self.section is not None)

    def _find_call(self, buf: str) -> tuple[int, int] | None:
        i = buf.find(self.call_open)
        return None if i < 0 else (i, i + len(self.call_open))

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        p = type(self)()
        content, deltas = p.feed(text)
        rest, more = p.finish()
        calls: list[ToolCall] = []
        for d in deltas + more:
            if d.id is not None:
                calls.append(ToolCall(d.id, d.name or "", ""))
            calls[d.index].arguments += d.arguments
        return (content + rest, calls) if calls else (text, [])

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        step = {"out": self._step_out, "section": self._step_section, "call": self._step_call}
        while step[self._state](final, out, deltas):
            pass
        if final and not self._called:
            out.append(self._ws)
            self._ws = ""
        return "".join(out), deltas

    def _text(self, s: str) -> str:
        """Content to send now. Whitespace is held until more content shows it is not the content's edge:
        once there are calls, the content has no leading or trailing whitespace."""
        t = self._ws + s
        core = t.rstrip()
        if self._fresh and self._called:
            core = core.lstrip()
        if not core:
            self._ws = t
            return ""
        self._ws, self._fresh = t[len(t.rstrip()):], False
        return core

    def _emit(self, out: list[str], deltas: list[ToolCallDelta], name: str | None = None, args: str = "") -> None:
        if name is not None:   # a call starts: its section is no longer content, its broken calls are
            bad, self._sec_raw, self._sec_bad = "".join(self._sec_bad), None, []
            out.append(self._text(bad))
            self._called, self._named = True, True
            deltas.append(ToolCallDelta(self._index, new_call_id(), name, args))
        elif args:
            if deltas and deltas[-1].index == self._index:
                deltas[-1].arguments += args
            else:
                deltas.append(ToolCallDelta(self._index, arguments=args))

    def _step_out(self, final: bool, out: list[str], deltas: list[ToolCallDelta]) -> bool:
        m = self._find_open(self._buf)
        if m is None:
            out.append(self._text(self._decided(final, self.section[0] if self.section else self.call_open)))
            return False
        i, j, sec = m
        out.append(self._text(self._buf[:i]))
        opener, self._buf = self._buf[i:j], self._buf[j:]
        if sec:
            self._state, self._sec_raw, self._sec_bad = "section", opener, []
        else:
            self._start_call(opener)
        return True

    def _step_section(self, final: bool, out: list[str], deltas: list[ToolCallDelta]) -> bool:
        close = self.section[1] if self.section else None
        c = self._buf.find(close) if close else -1
        m = self._find_call(self._buf)
        if m is not None and (c < 0 or m[0] < c):
            self._keep_raw(self._buf[:m[0]])   # between calls: dropped unless the section stays content
            opener, self._buf = self._buf[m[0]:m[1]], self._buf[m[1]:]
            self._start_call(opener)
            return True
        if c < 0 and not final:
            self._keep_raw(self._decided(final, self.call_open, close or ""))
            return False
        end = len(self._buf) if c < 0 else c + len(close or "")
        self._keep_raw(self._buf[:end])
        self._buf = self._buf[end:]
        if self._sec_raw is not None:   # no call was named: the whole section is content
            out.append(self._text(self._sec_raw))
        self._state, self._sec_raw, self._sec_bad = "out", None, []
        return True

    def _decided(self, final: bool, *markers: str) -> str:
        """Take the buffer up to what may still grow into one of `markers`."""
        cut = len(self._buf) - (0 if final else _partial(self._buf, markers))
        decided, self._buf = self._buf[:cut], self._buf[cut:]
        return decided

    def _keep_raw(self, s: str) -> None:
        if self._sec_raw is not None:
            self._sec_raw += s

    def _start_call(self, opener: str) -> None:
        self._state, self._opener, self._named, self._start = "call", opener, False, 0
        self._args: _Scan | None = None   # how far the arguments (from self._start) are known
        self._body = _Scan(0)             # llama3_json: where the call's object ends

    def _step_call(self, final: bool, out: list[str], deltas: list[ToolCallDelta]) -> bool:
        body = self._buf
        end = self._close(body)
        if end is None and not final:   # still open: send the name, then whatever arguments are certain
            if not self._named and (h := self._head(body)):
                self._emit(out, deltas, name=h[0])
                self._args, self._start = _Scan(h[1]), h[1]
            if self._args is not None and self.stream_args:
                sent = self._args.pos   # the scan stops short of what may be the close marker
                self._args.run(body[:len(body) - _partial(body, (self.call_close,))])
                self._emit(out, deltas, args=body[sent:self._args.pos])
            return False
        e, k = end or (len(body), len(body))
        r = self._call(body[:e])
        raw, self._buf = self._opener + body[:k], body[k:]
        self._state = "section" if self.section else "out"
        if r is not None and not self._named:
            self._emit(out, deltas, name=r[0], args=r[1])
        elif r is not None:
            sent = body[self._start:self._args.pos] if self._args is not None and self.stream_args else ""
            if r[1].startswith(sent):
                self._emit(out, deltas, args=r[1][len(sent):])
        elif self._sec_raw is not None:   # broken in a section that may stay content whole
            self._sec_raw += raw
            self._sec_bad.append(raw)
        elif not self._named:             # broken before its name went out: it is content
            out.append(self._text(raw))
        if self._named:
            self._index += 1
        return True


_JSON_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


class _JSONObjectCall(ToolParser):
    """A call is one JSON object {"name": N, "arguments" (or "parameters"): {...}}."""

    def _head(self, body: str) -> tuple[str, int] | None:
        m = _JSON_HEAD.match(body)
        name = _loads(f'"{m[1]}"') if m else None
        return None if name is None else (name, m.end())

    def _call(self, body: str) -> tuple[str, str] | None:
        obj = _loads(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        args = _loads(args) if isinstance(args, str) else args   # some models send the object as a string
        if not isinstance(args, dict):
            return None
        h = self._head(body)
        if h is not None and h[0] == obj["name"]:   # the model's own text, as the stream sent it
            raw = body[h[1]:_Scan(h[1]).run(body)]
            if _loads(raw) == args:
                return obj["name"], raw
        return obj["name"], json.dumps(args, ensure_ascii=False)


class HermesToolParser(_JSONObjectCall):
    name = "hermes"
    call_open, call_close = "<tool_call>", "</tool_call>"


class Llama3JsonToolParser(_JSONObjectCall):
    name = "llama3_json"
    section = ("<|python_tag|>", None)   # runs to the end of the output
    call_open, call_close = "{", ""

    def _find_open(self, buf: str) -> tuple[int, int, bool] | None:
        i = buf.find(self.section[0])
        if self._fresh and buf.lstrip().startswith("{"):   # an output that is JSON from its start
            j = len(buf) - len(buf.lstrip())
            return j, j, True
        return None if i < 0 else (i, i + len(self.section[0]), True)

    def _find_call(self, buf: str) -> tuple[int, int] | None:
        i = buf.find("{")
        return None if i < 0 else (i, i)   # the brace belongs to the body

    def _close(self, body: str) -> tuple[int, int] | None:
        e = self._body.run(body)
        return None if e is None else (e, e)


class _MarkedJSONCall(ToolParser):
    """Name in markers, then the arguments object as JSON text, then `tail` up to the call's close."""
    head: ClassVar[re.Pattern]
    tail: ClassVar[re.Pattern] = re.compile(r"\s*")

    def _head(self, body: str) -> tuple[str, int] | None:
        m = self.head.match(body)
        return None if m is None else (m[m.lastgroup].strip(), m.end())

    def _call(self, body: str) -> tuple[str, str] | None:
        h = self._head(body)
        e = _Scan(h[1]).run(body) if h else None
        if h is None or e is None or not h[0] or not self.tail.fullmatch(body, e):
            return None
        return (h[0], body[h[1]:e]) if isinstance(_loads(body[h[1]:e]), dict) else None


class DeepSeekV3ToolParser(_MarkedJSONCall):
    name = "deepseek_v3"
    section = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
    call_open, call_close = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
    head = re.compile(r"\s*(?:function<｜tool▁sep｜>(?P<name>[^\n]+)\n\s*(?:```(?:json)?\s*)?"
                      r"|(?P<name2>[^<\n]+?)<｜tool▁sep｜>\s*)(?=\{)")
    tail = re.compile(r"\s*(?:```\s*)?")


class KimiK2ToolParser(_MarkedJSONCall):
    name = "kimi_k2"
    section = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")
    call_open, call_close = "<|tool_call_begin|>", "<|tool_call_end|>"
    head = re.compile(r"\s*(?:functions\.)?(?P<name>[^\s:<]+)(?::\d+)?\s*<\|tool_call_argument_begin\|>\s*(?=\{)")


class _XMLArgsCall(ToolParser):
    """Name, then key/value pairs in tags; sent whole when the call closes."""
    stream_args = False
    head: ClassVar[re.Pattern]
    pair: ClassVar[re.Pattern]

    def _head(self, body: str) -> tuple[str, int] | None:
        m = self.head.match(body)
        return None if m is None or not m[1].strip() else (m[1].strip(), m.end())

    def _call(self, body: str) -> tuple[str, str] | None:
        h = self._head(body + "\n")   # a call without arguments ends right after its name
        if h is None:
            return None
        args = {k.strip(): _loads(v.strip("\n"), v.strip("\n")) for k, v in self.pair.findall(body, h[1])}
        return h[0], json.dumps(args, ensure_ascii=False)


class Glm45ToolParser(_XMLArgsCall):
    name = "glm45"
    call_open, call_close = "<tool_call>", "</tool_call>"
    head = re.compile(r"\s*([^\n<]+?)\s*(?=\n|<arg_key>)")
    pair = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


class MiniMaxToolParser(_XMLArgsCall):
    name = "minimax"
    section = ("<minimax:tool_call>", "</minimax:tool_call>")
    call_open, call_close = "<invoke name=", "</invoke>"
    head = re.compile(r"""\s*["']?([^"'>\n]+)["']?\s*>""")
    pair = re.compile(r"""<parameter name=["']?([^"'>]+)["']?\s*>(.*?)</parameter>""", re.S)


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (
    HermesToolParser, Llama3JsonToolParser, DeepSeekV3ToolParser, KimiK2ToolParser, Glm45ToolParser,
    MiniMaxToolParser)} | {"deepseek_v31": DeepSeekV3ToolParser, "minimax_m2": MiniMaxToolParser}   # vLLM's names


def get_tool_parser(name: str) -> type[ToolParser]:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of: {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]


# Checked in order: glm45's template also has <tool_call>, so its <arg_key> comes first.
_TEMPLATE_MARKERS = (("<minimax:tool_call>", "minimax"), ("<｜tool▁calls▁begin｜>", "deepseek_v3"),
                     ("<|tool_calls_section_begin|>", "kimi_k2"), ("<arg_key>", "glm45"), ("<tool_call>", "hermes"),
                     ("<|python_tag|>", "llama3_json"), ("ipython", "llama3_json"))
_ARCH_PREFIXES = (("Llama", "llama3_json"), ("Glm4Moe", "glm45"), ("MiniMaxM2", "minimax"),
                  ("DeepseekV3", "deepseek_v3"))


def detect_tool_parser(chat_template: str | None, architecture: str | None = None) -> str:
    """The format a model calls tools in, by the markers its chat template writes, else by its architecture."""
    for marker, name in _TEMPLATE_MARKERS:
        if chat_template and marker in chat_template:
            return name
    for prefix, name in _ARCH_PREFIXES:
        if architecture and architecture.startswith(prefix):
            return name
    return "hermes"
