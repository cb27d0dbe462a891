"""Reasoning split from the answer: `<think>R</think>C` -> reasoning_content R, content C, whole or streamed.

Two kinds of model: those whose chat template already opened `<think>` in the prompt (`starts_inside`:
the output is reasoning until `</think>`; a `<think>` the model writes again at the start is skipped), and
those that write `<think>` themselves (reasoning only when the output starts with it, after whitespace;
otherwise all of it is content, even a later `</think>`). An output that never closes its reasoning is all
reasoning. Newlines right after `</think>` (templates put "\\n\\n" there) are not content.

Parsers, by vLLM's --reasoning-parser names: deepseek_r1 (R1; also Qwen3-*-Thinking-2507, whose template
opens `<think>`) and minimax_m2 start inside; qwen3, glm45 and kimi_k2 write `<think>` themselves.
A stream cut anywhere joins to what `split` returns: partial tags are held back, nothing is taken back.
"""

from __future__ import annotations

from typing import ClassVar


def _partial(s: str, tag: str) -> int:
    """Length of the longest end of `s` that could still grow into `tag`."""
    for k in range(min(len(s), len(tag) - 1), 0, -1):
        if tag.startswith(s[-k:]):
            return k
    return 0


class ReasoningParser:
    name: ClassVar[str]
    start: ClassVar[str] = "<think>"
    end: ClassVar[str] = "</think>"
    starts_inside: ClassVar[bool] = False

    def __init__(self) -> None:
        self._buf = ""
        self._state = "begin"   # "begin" (is there a <think>?) | "inside" | "after" (newlines to drop) | "content"

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning_content, or None when there was none, content) of a whole output."""
        lead = text.lstrip()
        if lead.startswith(self.start):
            text = lead[len(self.start):]
        elif not self.starts_inside:
            return None, text
        reasoning, closed, content = text.partition(self.end)
        return reasoning or None, content.lstrip("\r\n") if closed else ""

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta) to send now."""
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        if self._state == "begin":
            lead = self._buf.lstrip()
            if not final and (not lead or len(lead) < len(self.start) and self.start.startswith(lead)):
                return "", ""   # may still open with <think>
            if lead.startswith(self.start):
                self._state, self._buf = "inside", lead[len(self.start):]
            else:
                self._state = "inside" if self.starts_inside else "content"
        if self._state == "inside":
            i = self._buf.find(self.end)
            if i < 0:
                keep = 0 if final else _partial(self._buf, self.end)
                reasoning, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return reasoning, ""
            reasoning, self._buf, self._state = self._buf[:i], self._buf[i + len(self.end):], "after"
        if self._state == "after":
            self._buf = self._buf.lstrip("\r\n")
            if self._buf:
                self._state = "content"
        content, self._buf = self._buf, ""
        return reasoning, content


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_inside = True


class MiniMaxM2ReasoningParser(ReasoningParser):
    name = "minimax_m2"
    starts_inside = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class Glm45ReasoningParser(ReasoningParser):
    name = "glm45"


class KimiK2ReasoningParser(ReasoningParser):
    name = "kimi_k2"


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (
    DeepSeekR1ReasoningParser, MiniMaxM2ReasoningParser, Qwen3ReasoningParser, Glm45ReasoningParser,
    KimiK2ReasoningParser)}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]
