"""vLLM's scheduling rule: each request has num_computed and num_tokens; every step hands out a token
budget so that computed catches up with total. Running requests (decodes, unfinished prefill chunks)
go first, then waiting ones (chunked prefill). When pages run out, the newest running request is
preempted by recompute: its pages are released and it waits at the front of the queue."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from attnzoo.engine.paged_cache import PagedKVCache
from attnzoo.engine.request import Request, Status

log = logging.getLogger("attnzoo.engine")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048   # per-step token budget; also the prefill chunk size


@dataclass
class StepPlan:
    requests: list[Request]
    num_new: list[int]                   # tokens to compute for each request this step

    @property
    def empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: PagedKVCache):
        self.cfg, self.kv = cfg, kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status, req.num_computed = Status.WAITING, 0
        req.spec_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        log.info("preempted %s (recompute); %d waiting", req.request_id, len(self.waiting))

    def schedule(self) -> StepPlan:
        budget = self.cfg.max_num_batched_tokens
        plan = StepPlan([], [])
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            # drafts (speculative decoding) ride along as extra tokens after the last sampled one
            n = self.kv.chunk(req, min(req.num_tokens + len(req.spec_ids) - req.num_computed, budget))
            if req.spec_ids and not self.kv.allocate(req, req.num_computed + n):
                req.spec_ids = []                  # drafts never cost another request its pages
                n = self.kv.chunk(req, min(req.num_tokens - req.num_computed, budget))
            while not self.kv.allocate(req, req.num_computed + n):
                victim = self.running[-1]          # the newest
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            del req.spec_ids[max(0, req.num_computed + n - req.num_tokens):]   # drafts the budget cut off
            plan.requests.append(req)
            plan.num_new.append(n)
            budget -= n
            i += 1
        # admit waiting requests while there is budget, room for sequences and no memory pressure
        first_pages: set[tuple[int, ...]] = set()   # prefixes this step computes from scratch
        deferred: list[Request] = []
        ps = self.kv.page_size
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs and not preempted:
            req = self.waiting[0]
            if req.num_computed == 0:
                self.kv.match_prefix(req)
                if req.first_scheduled_time is None:
                    req.cached_tokens = req.num_computed
            if self.kv.hybrid and self._prefilled_by_another(req):
                self.kv.free(req)
                req.num_computed = 0
                deferred.append(self.waiting.popleft())
                continue
            # In-batch prefix sharing (SGLang): a request whose first page starts like one being computed
            # from scratch in this very step waits one step and then hits the cache instead.
            head = tuple(req.token(t) for t in range(min(ps, req.num_tokens)))
            if self.kv.radix is not None and req.num_computed == 0 and req.num_tokens > ps:
                if head in first_pages:
                    self.kv.free(req)
                    deferred.append(self.waiting.popleft())
                    continue
                first_pages.add(head)
            n = self.kv.chunk(req, min(req.num_tokens - req.num_computed, budget))
            if not self.kv.allocate(req, req.num_computed + n):
                if not self.running and not plan.requests:
                    raise RuntimeError(f"request {req.request_id} cannot fit even alone: the KV cache is too small")
                self.kv.free(req)                  # give back the matched prefix; retry next step
                req.num_computed = 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.first_scheduled_time = req.first_scheduled_time or time.monotonic()
            self.running.append(req)
            plan.requests.append(req)
            plan.num_new.append(n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # they keep their place at the front
        return plan

    def _prefilled_by_another(self, req: Request) -> bool:
        """Hybrids: does a running request that is still prefilling compute the page after req's hit? Then req
        waits for it: the tree keeps window pages and states only at keep points, so req would otherwise
        recompute that prefix itself instead of hitting the point the other leaves (its prompt's end, a
        KEEP_EVERY point, or the branch point req finds afterwards). Only a heuristic on one page of tokens:
        a false match delays req, never changes its tokens."""
        h, ps = req.num_computed, self.kv.page_size
        if req.num_tokens < h + ps + 1:
            return False
        page = [req.token(t) for t in range(h, h + ps)]
        return any(r.num_computed < len(r.prompt_ids) - 1 and r.num_tokens >= h + ps
                   and [r.token(t) for t in range(h, h + ps)] == page for r in self.running)

    def finish(self, req: Request, reason: str) -> None:
        """Release a request's pages at once (finish or abort); it keeps its output."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        req.finished_time = time.monotonic()
