"""`LLM`: the offline engine. Requests in, continuous batching with chunked prefill, paged KV with a
radix prefix cache, preemption by recompute. Token-level stops (eos, stop_token_ids, length) are decided here;
outputs (text, stop strings, logprobs, timings) are built by engine/outputs.py, as for the server."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from attnzoo.engine.cache_plan import check_servable, plan_cache, sequence_bytes
from attnzoo.engine.cache_tensors import StashState
from attnzoo.engine.paged_cache import PagedKVCache
from attnzoo.engine.memory import available_memory, gib, kv_budget
from attnzoo.engine.model_runner import ModelRunner
from attnzoo.engine.outputs import OutputAssembler, RequestMetrics, RequestOutput
from attnzoo.engine.request import Request
from attnzoo.engine.sampling import Sampler, SamplingParams, SamplingRow, make_generator
from attnzoo.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from attnzoo.engine.speculative import SpecStats, SpeculativeConfig, make_drafter, verify_drafts
from attnzoo.engine.structured import GrammarCompiler, GrammarWait, grammar_pending
from attnzoo.engine.startup import check_count, check_deterministic, check_options, load_local, start_tensor_parallel
from attnzoo.engine.tp import EngineDeadError, TensorParallelGroup
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.registry import DEFAULT_MODEL, default_device

log = logging.getLogger("attnzoo.engine")


@dataclass
class _Group:
    """A user request: n completions (child requests) of one prompt, and its outputs."""
    children: list[Request]
    asm: OutputAssembler


def _close_on_error(init: Callable[..., None]) -> Callable[..., None]:
    """`LLM.__init__` that stops the tensor-parallel workers it started if it then fails (a cache plan that does
    not fit, say): the traceback keeps the half-built engine alive (a notebook keeps the last one), and with it
    the process group that the corrected retry needs."""
    @functools.wraps(init)
    def wrapper(self: "LLM", *args: object, **kw: object) -> None:
        try:
            init(self, *args, **kw)
        except BaseException:
            self.close()
            raise
    return wrapper


class LLM:
    @_close_on_error
    def __init__(self, model: str | os.PathLike | DecoderLM = DEFAULT_MODEL, *, dtype: str | torch.dtype = "auto",
                 page_size: int = 16, kv_cache_memory: int | None = None, kv_cache_fraction: float | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, seed: int = 0, device: str | torch.device | None = None,
                 deterministic: bool = False, tensor_parallel_size: int = 1, quantization: str = "auto",
                 detokenize: bool = True, enforce_eager: bool | None = None,
                 speculative_config: dict | str | SpeculativeConfig | None = None):
        """kv_cache_memory (bytes) or kv_cache_fraction (of the memory available at start-up) sets the KV
        budget; by default it is what max_num_seqs sequences of max_model_len tokens need, capped at
        DEFAULT_KV_CACHE_FRACTION (engine/memory.py) of the available memory and never less than one such
        sequence.
        max_model_len caps the context the engine serves (default and maximum: the model's).
        deterministic=True: every request gets the same tokens whatever runs beside it (batch-invariant
        matmuls and attention, docs/deterministic.md); CPU only, softmax-attention models only, slower.
        tensor_parallel_size=N > 1: N processes (this one and N-1 workers) each hold 1/N of the heads, MLP
        channels, vocabulary and KV cache (engine/tp.py, the rules in models/sharding.py); the model must be a
        transformers checkpoint directory; `close()` stops the workers.
        quantization ("auto", "none", "int4", "int8", "gguf"; `models.registry.resolve_quantization`): weight-only
        int4/int8 linears when loading by name or path. "auto" (the default) keeps a GGUF file's 4-bit weights
        as int4 on the CPU when max_num_seqs is 1, where that decodes faster, and loads float weights for
        batches, CUDA, deterministic mode and tensor parallelism (`models.registry.auto_quantization`; README
        "Quantised weights"); a passed-in model runs as it is.
        detokenize=False: outputs carry token ids only (text stays "") and stop strings are the caller's to
        apply (the server's API process does both, with the same `OutputAssembler`, and aborts a sequence that
        meets one).
        enforce_eager=True keeps every step eager; otherwise (the default) decode steps move to a compiled graph
        once a background compile is done (engine/graph.py; not under deterministic mode or tensor
        parallelism). None reads ATTNZOO_ENFORCE_EAGER=1 from the environment (the test suite sets it).
        speculative_config (vLLM's keys, a dict or JSON text; engine/speculative.py): draft tokens per request
        and verify them in one step, e.g. {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max":
        4, "prompt_lookup_min": 2}; outputs are the target's (greedy: the same tokens, sampled: the same
        distribution); each output counts its drafted and accepted tokens."""
        spec = SpeculativeConfig.parse(speculative_config)   # a bad config fails before anything loads
        check_options(page_size, max_num_seqs, max_num_batched_tokens, kv_cache_memory, kv_cache_fraction,
                      tensor_parallel_size)
        # the model and its KV cache live on one device: CUDA when present (paged decode runs the Triton
        # kernel there), else the CPU. dtype ("auto" decided for that device) applies when loading by name
        # or path; a passed-in model keeps its own
        self.device = torch.device(device) if device is not None else default_device()
        self.tp: TensorParallelGroup | None = None
        self._finalizer: weakref.finalize | None = None
        if tensor_parallel_size > 1:
            self.tp = start_tensor_parallel(model, dtype, tensor_parallel_size, deterministic, quantization,
                                            self.device)
            self.device, self.model = self.tp.device, self.tp.model
            # an engine only dropped (del, garbage-collected, interpreter exit) still stops its workers and leaves
            # the process group, so that the next engine in this process can start; the callback holds the group,
            # never this engine (which would then never be collected). close() runs it too, once.
            self._finalizer = weakref.finalize(self, self.tp.close)
        else:
            self.model = load_local(model, dtype, self.device, quantization, max_num_seqs, deterministic)
        self.tokenizer = self.model.tokenizer
        cfg = self.model.config
        if max_model_len is not None:  # longer than the model's own would run RoPE past what it was built for
            check_count("max_model_len", max_model_len, 1, cfg.max_position_embeddings, " (the model's context)")
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        dtype = self.model.embed_tokens.weight.dtype
        specs = self.model.cache_specs()
        check_servable(specs)
        # with prefix caching, a model with recurrent layers keeps up to one snapshot of its states per
        # sequence it can run (docs/engine.md, "Prefix caching for hybrids")
        # (every rank copies its own shard of them: the copies travel as instructions in each step's inputs)
        snapshots = max_num_seqs if enable_prefix_caching else 0
        fixed, per_seq = sequence_bytes(specs, page_size, dtype, max_num_seqs, max_num_batched_tokens,
                                        self.max_model_len, snapshots)
        available = None if kv_cache_memory is not None else available_memory(self.device)
        budget, why = kv_budget(fixed, per_seq, max_num_seqs, self.max_model_len, kv_cache_memory,
                                kv_cache_fraction, available)
        plan = plan_cache(specs, page_size, dtype, budget, max_num_seqs, max_num_batched_tokens, self.max_model_len,
                          snapshots)
        self.kv = PagedKVCache(specs, plan.num_pages, page_size, enable_prefix_caching,
                               num_state_slots=plan.state_slots, window_pages=plan.window_pages,
                               num_snapshots=plan.snapshot_slots,
                               keys_pages=max_num_seqs * -(-self.max_model_len // page_size) + 1)
        log.info("KV cache: %d pages x %d tokens = %d tokens, %s of %s (%s)%s", plan.num_pages, page_size,
                 plan.num_pages * page_size, gib(plan.total_bytes), str(dtype).removeprefix("torch."), why,
                 "; memory is taken as pages fill" if self.device.type == "cpu" else "")
        if available is not None and plan.total_bytes > available:
            log.warning("the KV cache can grow to %s but only %s is available now: long or many sequences may "
                        "exhaust memory; lower max_model_len or max_num_seqs", gib(plan.total_bytes), gib(available))
        if plan.window_pages or plan.state_slots:
            for line in self.kv.describe():
                log.info("  %s", line)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), self.kv)
        length = min(8192, self.max_model_len)
        log.info("fits %d concurrent sequences of %d tokens", self.max_concurrent_sequences(length), length)
        self.deterministic, self.detokenize = deterministic, detokenize
        if deterministic:
            check_deterministic(self.model, self.device, page_size)
        self.spec_config, self.drafter = spec, None
        if spec is not None:
            self.drafter = make_drafter(spec, self.model, self.max_model_len, self.device, self.scheduler)
            self.kv.stash = self.kv.states is not None   # a copy of each verified state, for rejected drafts
        self.spec_stats = SpecStats()
        # structured outputs: grammars compile on a worker thread; their requests wait here meanwhile
        self.structured = GrammarCompiler(self.tokenizer, cfg.vocab_size) if self.tokenizer else None
        self._grammar_wait = GrammarWait()
        self.runner = ModelRunner(self.model, self.kv.layout, deterministic, kv=self.kv)
        self.runner.want_hidden = hasattr(self.drafter, "on_forward")   # the MTP drafter reads the hidden states
        if enforce_eager is None:
            enforce_eager = os.environ.get("ATTNZOO_ENFORCE_EAGER") == "1"
        if not (enforce_eager or deterministic or self.tp is not None):
            # verify steps (a sequence's last token and its drafts, all sampling) run on the graph too
            rows = max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
            self.runner.start_graph(rows, self.max_model_len)
        if self.tp is not None:   # the workers build their shards of the cache with this plan
            self.tp.start_caches(self.kv.layout)
        self.sampler = Sampler(torch.Generator().manual_seed(seed))
        self.eos_token_ids = list(self.tokenizer.eos_token_ids) if self.tokenizer else list(cfg.eos_token_ids)
        self._groups: dict[str, _Group] = {}
        self._completions: dict[str, tuple[_Group, int]] = {}   # child request id -> its group and index
        self._ids = itertools.count()

    def health_error(self) -> str | None:
        """Why the engine cannot step (a tensor-parallel worker died), or None; cheap enough for /health."""
        if self.tp is None:
            return None
        if self.tp.dead is not None:
            return self.tp.dead
        for rank, p in enumerate(self.tp.procs, 1):
            if not p.is_alive():
                return f"tensor-parallel rank {rank} (pid {p.pid}) died (exit code {p.exitcode})"
        return None

    def close(self) -> None:
        """Stop the tensor-parallel workers and leave the process group (nothing to do in one process); the engine
        cannot step after. Idempotent; also what happens when the engine is garbage-collected."""
        if getattr(self, "_finalizer", None) is not None:   # getattr: from a failed __init__ too
            self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def max_concurrent_sequences(self, num_tokens: int) -> int:
        """How many sequences of num_tokens tokens (prompt + output) can run at once in this cache."""
        return min(self.kv.max_concurrency(num_tokens), self.scheduler.cfg.max_num_seqs)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, grammar_checked: bool = False) -> str:
        """Validate and queue; raises ValueError before anything is scheduled. A grammar is compiled here to
        check it (cached) unless `grammar_checked` (the server checks it in its own process), and again off the
        step loop, where its request waits until the matchers are ready."""
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
            raise ValueError(f"prompt has {len(ids)} tokens; the context (max_model_len) is {self.max_model_len} "
                             f"tokens")
        params.validate(vocab_size=vocab, max_model_len=self.max_model_len, prompt_len=len(ids))
        short = self.kv.pages_short(len(ids) + params.max_tokens, self.scheduler.cfg.max_num_batched_tokens)
        if short:
            need, have = short
            raise ValueError(f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) needs {need} KV "
                             f"pages but the cache holds {have}; lower max_tokens or raise kv_cache_memory")
        so = params.structured_outputs
        if so is not None and self.structured is None:
            raise ValueError("structured_outputs needs the model's tokenizer; this model has none")
        if so is not None and not grammar_checked:
            self.structured.compile(so)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._groups:
            raise ValueError(f"request_id {rid!r} is already in use")
        g = _Group([], OutputAssembler(rid, ids, params, self.tokenizer if self.detokenize else None))
        self._groups[rid] = g
        for i in range(params.n):
            p = params if params.n == 1 else _child_params(params, i)
            g.children.append(Request(f"{rid}#{i}" if params.n > 1 else rid, list(ids), p, generator=make_generator(p)))
            self._completions[g.children[i].request_id] = (g, i)
            if so is None:
                self.scheduler.add(g.children[i])
        if so is not None:
            self._grammar_wait.add(self.structured.submit(so, params.n), list(g.children), so)
        return rid

    def _finish_now(self, req: Request, reason: str) -> None:
        """End a completion now (pages freed) and tell its group's outputs."""
        g, i = self._completions[req.request_id]
        self.scheduler.finish(req, reason)
        g.asm.add(i, [], finish_reason=reason)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or only its completion `index`) now and free its pages; unknown or finished ids
        are ignored."""
        group = self._groups.get(request_id)
        for i, r in enumerate(group.children if group else []):
            if not r.finished and index in (None, i):
                self._grammar_wait.drop(r)
                self._finish_now(r, "abort")

    def _abort_all(self) -> None:
        for group in list(self._groups.values()):
            for r in group.children:
                if not r.finished:
                    self._grammar_wait.drop(r)
                    self.scheduler.finish(r, "abort")
        self._groups.clear()
        self._completions.clear()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or len(self._grammar_wait) > 0

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample, check stops. Returns snapshots of the request groups that
        changed (finished groups are then forgotten)."""
        if self.tp is not None and self.tp.dead is not None:
            raise EngineDeadError(self.tp.dead)
        start = time.perf_counter()
        if len(self._grammar_wait):   # requests whose grammar compiled join the scheduler (engine/structured.py)
            self._grammar_wait.admit(self.scheduler, self._finish_now)
        if self.drafter is not None:   # drafts for the requests whose prompt is computed
            self.drafter.throttle.tick()
            self.drafter.propose([r for r in self.scheduler.running
                                  if r.num_computed >= len(r.prompt_ids) and not grammar_pending(r)])
        plan = self.scheduler.schedule()
        if plan.empty:
            return self._collect(set())
        if self.kv.stash:
            self.kv.ops.extend(StashState(r.state_slot) for r in plan.requests if r.spec_ids)
        if self.tp is None:
            logits, sampling = self.runner.run(plan)
        else:
            inputs, sampling = self.runner.prepare(plan)
            try:
                logits = self.tp.run(self.runner, inputs)
            except EngineDeadError:
                self._abort_all()   # pending requests end; their pages go back before the error propagates
                raise
        if self.runner.want_hidden:   # before num_computed moves: the rows' positions start there
            self.drafter.on_forward(plan, self.runner.hidden)
        now = time.monotonic()
        for req, n in zip(plan.requests, plan.num_new):
            req.num_computed += n
        changed, emitted = set(), 0
        verified = any(r.spec_ids for r in plan.requests)
        decode_only = len(sampling) == len(plan.requests) and \
            all(n == 1 + len(r.spec_ids) for r, n in zip(plan.requests, plan.num_new))
        for req, toks, lps in self._sample(plan, sampling, logits):
            emitted += len(toks)
            req.first_token_time = req.first_token_time or now
            for tok, lp in zip(toks, lps):
                self._append(req, tok, lp)
                if req.finished:
                    break
            changed.add(req.request_id)
        for req in plan.requests:
            if not req.finished:
                self.kv.cache_prefix(req)
                self.kv.release_window(req)
        if self.drafter is not None and decode_only:   # what drafting earns: engine/speculative.py, Throttle
            self.drafter.throttle.observe(verified, emitted, time.perf_counter() - start)
        return self._collect(changed)

    def _sample(self, plan: StepPlan, sampling: list[int], logits: torch.Tensor
                ) -> list[tuple[Request, list[int], list[dict[int, float] | None]]]:
        """Each sampling request's new tokens and their logprobs (masked by their grammars, if any); a step with
        drafts verifies them (engine/speculative.py, verify_drafts)."""
        reqs = [plan.requests[i] for i in sampling]
        if not reqs:
            return []
        grammars = [r.grammar for r in reqs]
        if not any(r.spec_ids for r in reqs):
            allowed = self.structured.allowed(grammars) if any(grammars) else None
            result = self.sampler(logits, [SamplingRow(r.params, r.generator, r.prompt_ids, r.output_ids)
                                           for r in reqs], self.eos_token_ids, allowed)
            return [(r, [t], [lp]) for r, t, lp in zip(reqs, result.token_ids, result.logprobs)]
        return verify_drafts(self, plan, sampling, logits, grammars)

    def _append(self, req: Request, tok: int, logprob: dict[int, float] | None) -> None:
        """Token-level stops (eos, stop_token_ids, length) here; then the group's assembler, whose stop strings
        end a completion: it stops computing at once (the server aborts it in the core instead)."""
        p = req.params
        may_stop = len(req.output_ids) >= p.min_tokens
        new, reason = [tok], None
        if may_stop and not p.ignore_eos and tok in self.eos_token_ids:
            new, reason = [], "stop"                        # eos is not part of the output
        elif may_stop and tok in p.stop_token_ids:
            new, reason, req.stop_reason = [], "stop", tok
        else:
            req.output_ids.append(tok)
            if req.grammar is not None:
                req.grammar.accept(tok, self.tokenizer)
            if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
                reason = "length"
        g, i = self._completions[req.request_id]
        if g.asm.add(i, new, [logprob], reason, req.stop_reason):
            reason = "stop"                                  # a stop string: it wins over length
        if reason is not None:
            self.scheduler.finish(req, reason)

    def _collect(self, changed: set[str]) -> list[RequestOutput]:
        outs = []
        for rid, g in list(self._groups.items()):
            done = all(r.finished for r in g.children)
            if not done and not any(r.request_id in changed for r in g.children):
                continue
            first = g.children[0]
            metrics = RequestMetrics(first.arrival_time, first.first_scheduled_time, first.first_token_time,
                                     max((r.finished_time or 0) for r in g.children) if done else None)
            spec = (sum(r.num_draft_tokens for r in g.children), sum(r.num_accepted_tokens for r in g.children))
            outs.append(g.asm.snapshot(first.cached_tokens, metrics, sum(r.num_preemptions for r in g.children),
                                       spec))
            if done:
                del self._groups[rid]
                for r in g.children:
                    del self._completions[r.request_id]
        return outs

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
        """No page leaked or double-owned (the draft model's cache too); callable at any time."""
        self.kv.check_integrity(self.scheduler.running)
        if hasattr(self.drafter, "check_integrity"):
            self.drafter.check_integrity()

    def clear_prefix_cache(self) -> None:
        if self.kv.radix is not None:
            self.kv.radix.evict(self.kv.radix.cached_pages)


def _child_params(p: SamplingParams, i: int) -> SamplingParams:
    from dataclasses import replace
    return replace(p, n=1, seed=None if p.seed is None else p.seed + i)
