"""How much one request may ask for: every field that multiplies the server's work or memory has a bound
here, checked before anything is tokenised or queued. Each bound is a flag of `attnzoo serve`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from attnzoo.cli_args import bounded_int
from attnzoo.engine.sampling import MAX_LOGPROBS
from attnzoo.engine.structured import MAX_GRAMMAR_BYTES
from attnzoo.server.errors import APIError, num

if TYPE_CHECKING:
    from attnzoo.server.protocol import SamplingFields


def _limit(default: int, help: str, lo: int = 1, hi: int | None = None):
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi})


@dataclass(frozen=True)
class ServerLimits:
    # n fans one prompt out to n sequences; 128 is OpenAI's bound. best_of (which must equal n here) too.
    max_n: int = _limit(128, "most completions per prompt (n, best_of)")
    # a prompt list is one sequence per prompt: 64 fills one batch at the default --max-num-seqs
    max_prompts: int = _limit(64, "most prompts in one /v1/completions list")
    # every stop string is matched against the text's tail at every token: OpenAI allows 4, agent
    # frameworks send a few more; longer strings than 256 characters are mistakes, not stop markers
    max_stop: int = _limit(16, "most stop strings per request")
    max_stop_chars: int = _limit(256, "most characters in one stop string")
    max_stop_token_ids: int = _limit(256, "most stop_token_ids per request")
    # top-n logprobs sort the vocabulary per token; 20 is OpenAI's bound and the engine's
    max_logprobs: int = _limit(MAX_LOGPROBS, "most logprobs / top_logprobs per token", lo=0, hi=MAX_LOGPROBS)
    # a chat's cost is its rendered text, bounded by the body size; these keep the Python objects few
    max_messages: int = _limit(1024, "most messages in one chat request")
    max_content_parts: int = _limit(128, "most content parts in one message")
    # 8192 tokens as token ids is ~60 KB and a 128k-token context as text fits too; a JSON body this size
    # parses into at most a few tens of MB of Python objects
    max_body_bytes: int = _limit(2 << 20, "largest request body in bytes (413 beyond)")
    # sequences (n x prompts) waiting to be scheduled, beyond which requests get a 429: 16 batches at the
    # default --max-num-seqs; each waiting sequence holds its prompt, so memory stays bounded. A request
    # that alone fans out to more sequences can never run: a 400.
    max_queued_sequences: int = _limit(1024, "most sequences (n x prompts) waiting to run (429 beyond)")
    # structured outputs and tools: a grammar's source and its compile time bound its cost (the engine caches
    # compiled grammars); each tool adds a branch to the tool-call grammar and text to the prompt
    max_grammar_bytes: int = _limit(MAX_GRAMMAR_BYTES, "largest JSON schema / regex / grammar / tools list in bytes",
                                    hi=MAX_GRAMMAR_BYTES)
    max_grammar_compile_ms: int = _limit(10_000, "longest a grammar may take to compile, in ms (400 beyond)")
    max_tools: int = _limit(128, "most tools in one chat request")

    def __post_init__(self) -> None:
        for f in fields(self):
            v, lo, hi = getattr(self, f.name), f.metadata["lo"], f.metadata["hi"]
            if type(v) is not int or v < lo or (hi is not None and v > hi):
                raise ValueError(f"{f.name} must be an integer {_range(lo, hi)}, got {v!r}")

    # ---- the checks -------------------------------------------------------------------------------
    def check_request(self, req: SamplingFields, *, vocab_size: int, prompts: int = 1,
                      best_of: int | None = None) -> None:
        """The bounds every generation request shares: n, the sequences it fans out to, stop conditions."""
        self.check_n(req.n, best_of)
        self.check_prompts(prompts)
        self.check_fan_out(req.n * prompts, req.n, prompts)
        self.check_stop(req.stop, req.stop_token_ids, vocab_size)

    def check_n(self, n: int, best_of: int | None = None) -> None:
        if not 1 <= n <= self.max_n:
            raise APIError(400, f"n must be in [1, {self.max_n}], got {num(n)}", param="n")
        if best_of is not None and not 1 <= best_of <= self.max_n:
            raise APIError(400, f"best_of must be in [1, {self.max_n}], got {num(best_of)}", param="best_of")

    def check_stop(self, stop: str | list[str] | None, stop_token_ids: list[int] | None, vocab_size: int) -> None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > self.max_stop:
            raise APIError(400, f"stop has {len(stops)} strings; at most {self.max_stop} are allowed", param="stop")
        for i, s in enumerate(stops):
            where = "stop" if isinstance(stop, str) else f"stop.{i}"
            if not s:
                raise APIError(400, f"{where}: stop strings must be non-empty", param=where)
            if len(s) > self.max_stop_chars:
                raise APIError(400, f"{where} has {len(s)} characters; at most {self.max_stop_chars} are allowed",
                               param=where)
        ids = stop_token_ids or []
        if len(ids) > self.max_stop_token_ids:
            raise APIError(400, f"stop_token_ids has {len(ids)} ids; at most {self.max_stop_token_ids} are "
                                f"allowed", param="stop_token_ids")
        check_token_ids(ids, vocab_size, "stop_token_ids")

    def check_logprobs(self, value: int | None, param: str) -> None:
        if value is not None and not 0 <= value <= self.max_logprobs:
            raise APIError(400, f"{param} must be in [0, {self.max_logprobs}], got {num(value)}", param=param)

    def check_prompts(self, count: int) -> None:
        if count > self.max_prompts:
            raise APIError(400, f"prompt is a list of {count} prompts; at most {self.max_prompts} are allowed",
                           param="prompt")

    def check_messages(self, messages: list, param: str = "messages") -> None:
        if len(messages) > self.max_messages:
            raise APIError(400, f"{param} has {len(messages)} messages; at most {self.max_messages} are allowed",
                           param=param)
        for i, m in enumerate(messages):
            if isinstance(m.content, list) and len(m.content) > self.max_content_parts:
                raise APIError(400, f"{param}.{i}.content has {len(m.content)} parts; at most "
                                    f"{self.max_content_parts} are allowed", param=f"{param}.{i}.content")

    def check_fan_out(self, sequences: int, n: int, prompts: int) -> None:
        """A request that alone exceeds the queue could never be admitted: a 400, not a retryable 429."""
        if sequences > self.max_queued_sequences:
            raise APIError(400, f"this request fans out to {sequences} sequences (n={n} x {prompts} prompts); "
                                f"the server queues at most {self.max_queued_sequences}", param="n",
                           code="too_many_sequences")

    # ---- the command line -----------------------------------------------------------------------
    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        """One flag per field: --max-n, --max-prompts, ..., --max-queued-sequences."""
        for f in fields(ServerLimits):
            p.add_argument("--" + f.name.replace("_", "-"), type=bounded_int(f.metadata["lo"], f.metadata["hi"]),
                           default=f.default, metavar="N", help=f"{f.metadata['help']} (default {f.default})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        shown = ", ".join(num(t) for t in bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise APIError(400, f"{param}: token ids must be in [0, {vocab_size}), got {shown}", param=param)


def _range(lo: int, hi: int | None) -> str:
    return f"in {lo}..{hi}" if hi is not None else f">= {lo}"
