"""Prometheus metrics (vLLM's names with an `attnzoo:` prefix) and the periodic stats log line. The
spec_decode_* metrics (and the line's acceptance figures) exist only when the engine drafts, as in vLLM.

Everything here is updated on the event loop from the engine core's step messages (engine_client.py)."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from attnzoo.engine.outputs import RequestOutput
from attnzoo.engine.speculative import MAX_SPECULATIVE_TOKENS
from attnzoo.server.core_messages import EngineStats

log = logging.getLogger("attnzoo.server")

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0, 160.0, 640.0)
_ACCEPTANCE_LENGTH = tuple(range(1, MAX_SPECULATIVE_TOKENS + 2))   # kept drafts + 1: 1 up to k + 1
LOG_INTERVAL_S = 5.0


class ServerMetrics:
    def __init__(self, model_name: str, speculative: bool = False):
        """speculative: the engine drafts (a speculative_config); the spec_decode metrics exist only then."""
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"attnzoo:{name}", doc, lab, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"attnzoo:{name}", doc, lab, registry=r).labels(model_name)

        def hist(name: str, doc: str, buckets: tuple = _LATENCY) -> Histogram:
            return Histogram(f"attnzoo:{name}", doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV pages in use (0-1).")
        # prometheus_client appends _total to counters itself
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Requests preempted (recomputed later).")
        self._success = Counter("attnzoo:request_success", "Finished requests by reason.",
                                lab + ["finished_reason"], registry=r)
        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token.")
        self.itl = hist("inter_token_latency_seconds", "Time between generated tokens.")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.")
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.")
        self.speculative = speculative
        if speculative:
            self.spec_drafts = counter("spec_decode_num_drafts", "Verifies of a request's drafts.")
            self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
            self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
            self.spec_length = hist("spec_decode_acceptance_length", "Tokens a verify gave a request: accepted "
                                    "drafts + 1.", _ACCEPTANCE_LENGTH)
        self.model_name = model_name
        self._seen_preemptions = self._seen_drafted = self._seen_accepted = 0
        self._last_log = time.monotonic()
        self._reset_window()

    def _reset_window(self) -> None:
        """What the next log line averages over."""
        self._win_prompt = self._win_gen = self._win_queries = self._win_hits = 0
        self._win_drafts = self._win_drafted = self._win_accepted = 0

    def on_step(self, s: EngineStats) -> None:
        self.running.set(s.running)
        self.waiting.set(s.waiting)
        self.kv_usage.set(s.kv_usage)
        if s.num_preemptions > self._seen_preemptions:
            self.preemptions.inc(s.num_preemptions - self._seen_preemptions)
            self._seen_preemptions = s.num_preemptions
        if self.speculative:
            self._on_spec(s)

    def _on_spec(self, s: EngineStats) -> None:
        drafted, accepted = s.spec_drafted - self._seen_drafted, s.spec_accepted - self._seen_accepted
        self._seen_drafted, self._seen_accepted = s.spec_drafted, s.spec_accepted
        self.spec_drafts.inc(len(s.spec_lengths))
        self.spec_draft_tokens.inc(drafted)
        self.spec_accepted_tokens.inc(accepted)
        for n in s.spec_lengths:
            self.spec_length.observe(n)
        self._win_drafts += len(s.spec_lengths)
        self._win_drafted += drafted
        self._win_accepted += accepted

    def on_first_token(self, out: RequestOutput) -> None:
        n = len(out.prompt_token_ids)
        self.prompt_tokens.inc(n)
        self.prefix_queries.inc(n)
        self.prefix_hits.inc(out.cached_tokens)
        self._win_prompt += n
        self._win_queries += n
        self._win_hits += out.cached_tokens
        m = out.metrics
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        if m.queue_time is not None:
            self.queue.observe(m.queue_time)

    def on_tokens(self, new_tokens: int, gap_s: float | None) -> None:
        self.generation_tokens.inc(new_tokens)
        self._win_gen += new_tokens
        if gap_s is not None:
            self.itl.observe(gap_s)

    def on_finished(self, out: RequestOutput) -> None:
        # a group's reason is its first child's; n > 1 groups count once, as one request
        self._success.labels(self.model_name, out.outputs[0].finish_reason or "abort").inc()
        m = out.metrics
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)

    def maybe_log(self, s: EngineStats, busy: bool) -> None:
        """vLLM's periodic line, every LOG_INTERVAL_S while there is or was work in the window."""
        now = time.monotonic()
        dt = now - self._last_log
        if dt < LOG_INTERVAL_S or not (busy or self._win_prompt or self._win_gen):
            return
        hit = 100.0 * self._win_hits / self._win_queries if self._win_queries else 0.0
        line = ("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%")
        values = [self._win_prompt / dt, self._win_gen / dt, s.running, s.waiting, 100.0 * s.kv_usage, hit]
        if self.speculative:
            line += ", Draft acceptance rate: %.1f%%, Mean acceptance length: %.2f"
            values += [100.0 * self._win_accepted / max(self._win_drafted, 1),
                       1 + self._win_accepted / max(self._win_drafts, 1)]
        log.info(line, *values)
        self._last_log = now
        self._reset_window()
