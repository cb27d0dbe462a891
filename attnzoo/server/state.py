"""What every handler needs: the engine, the served model's names, the limits and the admission checks."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter

from attnzoo.engine.sampling import SamplingParams
from attnzoo.engine.structured import GrammarCompiler
from attnzoo.server.engine_client import EngineClient, EngineDead
from attnzoo.server.errors import APIError, from_value_error, short
from attnzoo.server.limits import ServerLimits, check_token_ids
from attnzoo.server.metrics import ServerMetrics

LONG_TEXT_CHARS = 32_768     # ~8k tokens of prose: tokenises in a few ms with a few MB


@dataclass
class ServerState:
    engine: EngineClient
    metrics: ServerMetrics
    model_name: str
    model_aliases: set[str] = field(default_factory=set)   # e.g. the model's path
    api_key: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    stall_timeout_s: float = 60.0
    reasoning_parser: str | None = None   # server/reasoning.py name; None: no reasoning split
    tool_call_parser: str | None = None   # server/tool_parsers.py name; None: detected from the chat template
    created: int = field(default_factory=lambda: int(time.time()))
    _long_texts: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="attnzoo-tokenize"), repr=False)

    # what the engine core reported at start (EngineInfo), read through
    tokenizer = property(attrgetter("engine.info.tokenizer"))
    kv_tokens = property(attrgetter("engine.info.kv_tokens"))
    vocab_size = property(attrgetter("engine.info.vocab_size"))
    max_model_len = property(attrgetter("engine.info.max_model_len"))

    @cached_property
    def grammar(self) -> GrammarCompiler | None:
        """Compiles structured-output grammars to check them before queueing (the engine core has its own)."""
        return GrammarCompiler(self.tokenizer, self.vocab_size) if self.tokenizer else None

    @cached_property
    def tool_parser(self) -> str:
        from attnzoo.server.tool_parsers import detect_tool_parser
        return self.tool_call_parser or detect_tool_parser(self.tokenizer.chat_template if self.tokenizer else None)

    @cached_property
    def max_prompt_chars(self) -> int:
        """No token covers more characters than its vocabulary string has (one per byte for byte-level BPE,
        one per character for SentencePiece), so text longer than this cannot fit the context however it
        is tokenised; rejecting it skips tokenising megabytes. Assumes the normalizer deletes nothing."""
        tok = self.tokenizer
        longest = max(len(tok.token_str(i) or "") for i in range(tok.vocab_size))
        return self.max_model_len * max(1, longest)

    def close(self) -> None:
        self._long_texts.shutdown(wait=False, cancel_futures=True)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name and name not in self.model_aliases:
            raise APIError(404, f"The model {short(name)} does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        check_token_ids(ids, self.vocab_size, param)
        return ids

    def admit(self, sequences: int) -> None:
        """Reject before queueing when the waiting sequences would exceed the bound (vLLM's
        --max-num-queued-reqs, counted in sequences because n and prompt lists fan out)."""
        bound = self.limits.max_queued_sequences
        if self.engine.queued() + sequences > bound:
            raise APIError(429, f"The server is overloaded: more than {bound} sequences would be waiting. "
                                f"Retry later.", code="server_overloaded")

    async def encode(self, text: str) -> list[int]:
        # off the event loop: a long prompt takes milliseconds to tokenize. Long texts take one thread of
        # their own, one at a time: tokenising 600k characters peaks at ~300 MB, and every thread that did
        # it would keep that much in its malloc arena.
        if len(text) < LONG_TEXT_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, text)
        return await asyncio.get_running_loop().run_in_executor(self._long_texts, self.tokenizer.encode, text)

    async def encode_prompt(self, text: str, where: str) -> list[int]:
        """Tokenise text that must fit the context, refusing text that cannot before tokenising it."""
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"{where} has {len(text)} characters: more than can fit in the model's context "
                                f"of {self.max_model_len} tokens however it is tokenised (at most "
                                f"{self.max_prompt_chars} characters)", param=where.split(".")[0],
                           code="context_length_exceeded")
        return await self.encode(text)

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[str], asyncio.Queue]:
        """Add every prompt or none; the ids share one queue. Admission and posting happen without an
        await in between, so concurrent handlers cannot overshoot the queue bound together."""
        self.admit(sum(p.n for p in params))
        queue: asyncio.Queue = asyncio.Queue()
        rids = [self.engine.new_id() for _ in prompts]
        try:
            futs = self.engine.add_all(list(zip(rids, prompts, params)), queue)
        except EngineDead as e:
            raise APIError(503, str(e), code="engine_dead") from None
        try:
            results = await asyncio.gather(*futs, return_exceptions=True)
        except BaseException:          # cancelled: the adds may still land, so abort them all
            for rid in rids:
                self.engine.abort(rid)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for rid in rids:
                self.engine.abort(rid)
            e = errors[0]
            if isinstance(e, ValueError):
                raise from_value_error(e) from None
            if isinstance(e, EngineDead):
                raise APIError(503, str(e), code="engine_dead") from None
            raise e
        return rids, queue


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
