"""In the API process: turn the core's token deltas for one request back into `RequestOutput` snapshots,
detokenising each completion and applying its stop strings with the engine's own `RequestDetokenizer`.

A completion that meets a stop string ends here at once (finish_reason "stop", as offline); the caller
aborts it in the core, which may have sampled a token more meanwhile: later tokens are ignored."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from attnzoo.engine.detokenizer import RequestDetokenizer
from attnzoo.engine.llm import CompletionOutput, RequestMetrics, RequestOutput
from attnzoo.engine.sampling import SamplingParams
from attnzoo.models.tokenizer import Tokenizer
from attnzoo.server.core_messages import GroupDelta


@dataclass
class _Completion:
    detok: RequestDetokenizer | None          # None: a model without a tokenizer (token ids only)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class OutputAssembler:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None):
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self.seqs = [_Completion(RequestDetokenizer(tokenizer, params.stop or [], prompt_ids) if tokenizer else None)
                     for _ in range(params.n)]
        self._emitted = ""           # completion 0's text in the previous snapshot (for delta_text)
        self.finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def update(self, g: GroupDelta) -> tuple[RequestOutput, list[int]]:
        """Apply one step's delta; returns the snapshot and the completions that just met a stop string
        (to abort in the core)."""
        stopped = []
        for d in g.seqs:
            s = self.seqs[d.index]
            if s.finish_reason is not None:          # ended here already: the core's late tokens are moot
                continue
            for j, tok in enumerate(d.token_ids):
                s.token_ids.append(tok)
                if d.logprobs is not None:
                    s.logprobs = s.logprobs or []
                    s.logprobs.append(d.logprobs[j])
                if s.detok is not None and s.detok.push(tok)[1]:
                    s.finish_reason, s.stop_reason = "stop", s.detok.stop_reason
                    stopped.append(d.index)
                    break
            else:
                if d.finish_reason is not None:
                    s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
        done = self.finished
        comps = []
        for i, s in enumerate(self.seqs):
            text = "" if s.detok is None else s.detok.finish() if s.finish_reason is not None else s.detok.text
            comps.append(CompletionOutput(i, text, list(s.token_ids), s.finish_reason, s.stop_reason,
                                         None if s.logprobs is None else list(s.logprobs)))
        delta, self._emitted = comps[0].text[len(self._emitted):], comps[0].text
        m = g.metrics
        if done and self.finished_time is None:
            self.finished_time = m.finished_time or time.monotonic()   # a stop string ends it before the core
        metrics = RequestMetrics(m.arrival_time, m.first_scheduled_time, m.first_token_time,
                                 self.finished_time if done else None)
        return (RequestOutput(self.request_id, self.prompt_ids, comps, done, g.cached_tokens, metrics, delta,
                              g.num_preemptions), stopped)
