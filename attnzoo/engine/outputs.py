"""What a request gives back (`RequestOutput`: its completions, finish reasons, cached tokens, timings) and the
one place that builds it: `OutputAssembler` turns a request's completions, fed as the engine's token ids,
logprobs and finish reasons arrive, into snapshots, detokenising each completion and applying its stop
strings with the engine's `RequestDetokenizer`.

Both outputs paths use it: the offline `LLM` feeds it each sampled token, the server's API process each token
delta the engine core sends (engine_client.py). EOS and stop_token_ids are the engine's (token level); stop
strings are the assembler's: a completion that meets one ends here at once (finish_reason "stop",
stop_reason the string), `add` says so, and the caller stops it in the engine (`LLM` finishes it in the
scheduler; the API process aborts it in the core, which may have sampled a token more: later tokens are
ignored)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from attnzoo.engine.detokenizer import RequestDetokenizer
from attnzoo.engine.sampling import SamplingParams
from attnzoo.models.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None          # stop | length | abort; None while running
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    cached_tokens: int
    metrics: RequestMetrics
    delta_text: str = ""                 # streaming: text added since the previous snapshot
    num_preemptions: int = 0
    num_draft_tokens: int = 0            # speculative decoding: drafts verified, over all completions
    num_accepted_tokens: int = 0         # of which the target kept

    # single-completion conveniences (n == 1)
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class _Completion:
    detok: RequestDetokenizer | None          # None: token ids only (no tokenizer, or LLM(detokenize=False))
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class OutputAssembler:
    """One request's n completions, from the engine's token ids to `RequestOutput` snapshots."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None):
        """tokenizer None: outputs carry token ids only (text stays "") and stop strings are not applied."""
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self.seqs = [_Completion(RequestDetokenizer(tokenizer, params.stop or [], prompt_ids) if tokenizer else None,
                                 logprobs=[] if params.logprobs is not None else None) for _ in range(params.n)]
        self._emitted = ""           # completion 0's text in the previous snapshot (for delta_text)
        self.finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def add(self, index: int, token_ids: list[int], logprobs: list[dict[int, float]] | None = None,
            finish_reason: str | None = None, stop_reason: int | str | None = None) -> bool:
        """Completion `index`'s new tokens (logprobs: one per token) and, when the engine ended it, why. Returns
        True when a stop string ended it now (the caller stops it in the engine); a completion that ended
        already ignores what comes after."""
        s = self.seqs[index]
        if s.finish_reason is not None:
            return False
        for j, tok in enumerate(token_ids):
            s.token_ids.append(tok)
            if logprobs is not None and s.logprobs is not None:
                s.logprobs.append(logprobs[j])
            if s.detok is not None and s.detok.push(tok)[1]:
                s.finish_reason, s.stop_reason = "stop", s.detok.stop_reason
                return True
        if finish_reason is not None:
            s.finish_reason, s.stop_reason = finish_reason, stop_reason
        return False

    def snapshot(self, cached_tokens: int, metrics: RequestMetrics, num_preemptions: int,
                 spec: tuple[int, int] = (0, 0)) -> RequestOutput:
        """The request now. metrics are the engine's; a request that ended here (a stop string) before the
        engine reported it finished gets now as its finished time."""
        done = self.finished
        comps = []
        for i, s in enumerate(self.seqs):
            text = "" if s.detok is None else s.detok.finish() if s.finish_reason is not None else s.detok.text
            comps.append(CompletionOutput(i, text, list(s.token_ids), s.finish_reason, s.stop_reason,
                                          None if s.logprobs is None else list(s.logprobs)))
        delta, self._emitted = comps[0].text[len(self._emitted):], comps[0].text
        if done and self.finished_time is None:
            self.finished_time = metrics.finished_time or time.monotonic()
        metrics = RequestMetrics(metrics.arrival_time, metrics.first_scheduled_time, metrics.first_token_time,
                                 self.finished_time if done else None)
        return RequestOutput(self.request_id, self.prompt_ids, comps, done, cached_tokens, metrics, delta,
                             num_preemptions, *spec)
