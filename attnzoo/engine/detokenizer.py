"""Per-request incremental detokenizer with stop strings (vLLM's include_stop_str_in_output=False).

Decoding is incremental: only ids[prefix_offset:] are decoded each step and diffed against the decode of
ids[prefix_offset:read_offset], so the cost does not grow with the output. A few prompt ids give the first
tokens their left context (decoders such as SentencePiece's drop a leading space at the start).
"""

from __future__ import annotations

from attnzoo.models.tokenizer import Tokenizer

_PROMPT_CONTEXT = 5  # prompt ids kept as left context for the first decodes
_REPLACEMENT = "\ufffd"


class RequestDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], prompt_ids: list[int] | None = None):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = list((prompt_ids or [])[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0              # start of the window that is re-decoded each step
        self.read_offset = len(self.ids)    # ids before this are already turned into text
        self.output_ids: list[int] = []
        self._decoded = ""                  # all decoded output text, including held-back text
        self.text = ""                      # emitted text: never holds a stop string or a live prefix of one
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that matched

    def _decode_step(self) -> str:
        """New text since read_offset; "" while the tail is an incomplete UTF-8 character (U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # a special token (skipped) or a split character: wait for more ids
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def _held_back(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:k]):
                    best = k
                    break
        return best

    def _advance(self, new_text: str, final: bool) -> str:
        # Pending text never contains a stop string nor begins one before len(self.text) (that prefix
        # would have been held back), so searching from there finds the earliest occurrence.
        self._decoded += new_text
        start = len(self.text)
        hits = [(i, s) for s in self.stop if (i := self._decoded.find(s, start)) >= 0]
        if hits:
            # the stop that completes first wins (as when text arrives one character at a time), so the
            # result does not depend on how the text was split into tokens; ties go to the earlier start
            end, self.stop_reason = min(hits, key=lambda h: (h[0] + len(h[1]), h[0]))
            self.stopped = True
        else:
            end = len(self._decoded) if final else len(self._decoded) - self._held_back(self._decoded[start:])
        delta = self._decoded[start:end]
        self.text += delta
        return delta

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated token; return (text now safe to emit, stopped). Emitted text never contains a
        stop string or a prefix of one that may still complete; on a match, the text before it is returned
        with stopped=True and self.text ends there. Tokens pushed after a stop are ignored."""
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        self.output_ids.append(token_id)
        delta = self._advance(self._decode_step(), final=False)
        return delta, self.stopped

    def flush(self) -> str:
        """At the end (length/eos): release held-back text. A trailing incomplete UTF-8 character is dropped
        rather than emitted as U+FFFD."""
        if self.stopped:
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        tail = self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix):].rstrip(_REPLACEMENT)
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._advance(tail, final=True)

    def finish(self) -> str:
        """The sequence ended, whatever ended it: release held-back text (once) and return the whole text."""
        self.flush()
        return self.text
