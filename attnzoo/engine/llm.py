"""`LLM`: the offline engine. Requests in, continuous batching with chunked prefill, paged KV with a
radix prefix cache, preemption by recompute, and outputs with text, token ids, finish reason,
cached tokens, logprobs and timings."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from attnzoo.engine.detokenizer import RequestDetokenizer
from attnzoo.engine.kv_cache import PagedKVCache, plan_cache
from attnzoo.engine.model_runner import ModelRunner
from attnzoo.engine.request import Request, Status
from attnzoo.engine.sampling import Sampler, SamplingParams, SamplingRow, make_generator
from attnzoo.engine.scheduler import Scheduler, SchedulerConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.registry import DEFAULT_MODEL, load_model

log = logging.getLogger("attnzoo.engine")


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
class _Group:
    """A user request: n completions (child requests) of one prompt."""
    request_id: str
    children: list[Request]
    emitted: list[str] = field(default_factory=list)


def _free_memory_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class LLM:
    def __init__(self, model: str | os.PathLike | DecoderLM = DEFAULT_MODEL, *, dtype: str | torch.dtype = "auto",
                 page_size: int = 16,
                 kv_cache_memory: int | None = None, kv_cache_fraction: float = 0.25, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True, seed: int = 0,
                 device: str | torch.device | None = None):
        # dtype applies when loading by name or path; a passed-in model keeps its own
        self.model = model if isinstance(model, DecoderLM) else load_model(model, dtype)
        # the model and its KV cache live on one device: CUDA when present (paged decode runs the Triton
        # kernel there), else the CPU
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.model.to(self.device)
        self.tokenizer = self.model.tokenizer
        cfg = self.model.config
        self.max_model_len = cfg.max_position_embeddings
        dtype = self.model.embed_tokens.weight.dtype
        specs = self.model.cache_specs()
        if kv_cache_memory is not None:
            budget = kv_cache_memory
        elif self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * kv_cache_fraction)
        else:
            budget = int(_free_memory_bytes() * kv_cache_fraction)
        plan = plan_cache(specs, page_size, dtype, budget, max_num_seqs, max_num_batched_tokens, self.max_model_len)
        self.kv = PagedKVCache(specs, plan.num_pages, page_size, dtype, enable_prefix_caching, self.device,
                               num_state_slots=plan.state_slots, window_pages=plan.window_pages)
        log.info("KV cache: %d pages x %d tokens = %d tokens (%.1f MiB)", plan.num_pages, page_size,
                 plan.num_pages * page_size, plan.total_bytes / 2**20)
        if plan.window_pages or plan.state_slots:
            for line in self.kv.describe():
                log.info("  %s", line)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), self.kv)
        length = min(8192, self.max_model_len)
        log.info("fits %d concurrent sequences of %d tokens", self.max_concurrent_sequences(length), length)
        self.runner = ModelRunner(self.model, self.kv)
        self.sampler = Sampler(torch.Generator().manual_seed(seed))
        self.eos_token_ids = list(self.tokenizer.eos_token_ids) if self.tokenizer else list(cfg.eos_token_ids)
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count()

    def max_concurrent_sequences(self, num_tokens: int) -> int:
        """How many sequences of num_tokens tokens (prompt + output) can run at once in this cache."""
        return min(self.kv.max_concurrency(num_tokens), self.scheduler.cfg.max_num_seqs)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue; raises ValueError before anything is scheduled."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens")
        params.validate(vocab_size=vocab, max_model_len=self.max_model_len, prompt_len=len(ids))
        need = -(-(len(ids) + params.max_tokens) // self.kv.page_size)
        if need > self.kv.num_pages:
            raise ValueError(f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) needs {need} KV "
                             f"pages but the cache holds {self.kv.num_pages}; lower max_tokens or raise "
                             f"kv_cache_memory")
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._groups:
            raise ValueError(f"request_id {rid!r} is already in use")
        children = []
        for i in range(params.n):
            p = params if params.n == 1 else _child_params(params, i)
            children.append(Request(f"{rid}#{i}" if params.n > 1 else rid, list(ids), p,
                                    generator=make_generator(p),
                                    detokenizer=RequestDetokenizer(self.tokenizer, p.stop or [], ids)
                                    if self.tokenizer else None))
        self._groups[rid] = _Group(rid, children, [""] * len(children))
        for r in children:
            self.scheduler.add(r)
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its pages; unknown or finished ids are ignored."""
        group = self._groups.get(request_id)
        for r in group.children if group else []:
            if not r.finished:
                self.scheduler.finish(r, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample, check stops. Returns snapshots of the request groups that
        changed (finished groups are then forgotten)."""
        plan = self.scheduler.schedule()
        if plan.empty:
            return self._collect(set())
        logits, sampling = self.runner.run(plan)
        now = time.monotonic()
        for req, n in zip(plan.requests, plan.num_new):
            req.num_computed += n
        reqs = [plan.requests[i] for i in sampling]
        result = self.sampler(logits, [SamplingRow(r.params, r.generator, r.prompt_ids, r.output_ids) for r in reqs],
                              self.eos_token_ids) if reqs else None
        changed = set()
        for j, req in enumerate(reqs):
            tok = result.token_ids[j]
            req.first_token_time = req.first_token_time or now
            if result.logprobs[j] is not None:
                req.logprobs = (req.logprobs or []) + [result.logprobs[j]]
            self._append(req, tok)
            changed.add(req.request_id)
        for req in plan.requests:
            if not req.finished:
                self.kv.cache_prefix(req)
                self.kv.release_window(req)
        return self._collect(changed)

    def _append(self, req: Request, tok: int) -> None:
        p = req.params
        stop_ids = set(p.stop_token_ids or [])
        may_stop = len(req.output_ids) >= p.min_tokens
        if may_stop and not p.ignore_eos and tok in self.eos_token_ids:
            return self.scheduler.finish(req, "stop")       # eos is not part of the output
        if may_stop and tok in stop_ids:
            req.stop_reason = tok
            return self.scheduler.finish(req, "stop")
        req.output_ids.append(tok)
        if req.detokenizer is not None:
            _, stopped = req.detokenizer.push(tok)
            if stopped:
                req.stop_reason = req.detokenizer.stop_reason
                return self.scheduler.finish(req, "stop")
        if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            self.scheduler.finish(req, "length")

    def _collect(self, changed: set[str]) -> list[RequestOutput]:
        outs = []
        for rid, g in list(self._groups.items()):
            done = all(r.finished for r in g.children)
            if not done and not any(r.request_id in changed for r in g.children):
                continue
            outs.append(self._snapshot(g, done))
            if done:
                del self._groups[rid]
        return outs

    def _snapshot(self, g: _Group, done: bool) -> RequestOutput:
        comps, delta = [], ""
        for i, r in enumerate(g.children):
            text = r.detokenizer.text if r.detokenizer else ""
            if r.finished and r.detokenizer and r.finish_reason != "stop":
                text += r.detokenizer.flush()
            delta += text[len(g.emitted[i]):] if i == 0 else ""
            g.emitted[i] = text
            comps.append(CompletionOutput(i, text, list(r.output_ids), r.finish_reason, r.stop_reason, r.logprobs))
        first = g.children[0]
        metrics = RequestMetrics(first.arrival_time, first.first_scheduled_time, first.first_token_time,
                                 max((r.finished_time or 0) for r in g.children) if done else None)
        return RequestOutput(g.request_id, first.prompt_ids, comps, done, first.cached_tokens, metrics, delta,
                             sum(r.num_preemptions for r in g.children))

    # ---- conveniences ---------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion, batched; outputs in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        params = [p or SamplingParams() for p in params]
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(prompt, p))
        except ValueError:
            for rid in ids:           # all or nothing: do not leave half a batch queued
                self.abort(rid)
            self._collect(set())
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        while len(results) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in ids:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation or a list of them, rendered with the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield snapshots of one request as tokens arrive (other queued requests progress too)."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(rid)
            self._collect(set())

    def check_integrity(self) -> None:
        """No page leaked or double-owned; callable at any time."""
        self.kv.check_integrity(self.scheduler.running)

    def clear_prefix_cache(self) -> None:
        if self.kv.radix is not None:
            self.kv.radix.evict(self.kv.radix.cached_pages)


def _child_params(p: SamplingParams, i: int) -> SamplingParams:
    from dataclasses import replace
    return replace(p, n=1, seed=None if p.seed is None else p.seed + i)
