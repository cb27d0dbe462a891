"""`LLM`: the offline engine. Requests in, continuous batching with chunked prefill, paged KV with a
radix prefix cache, preemption by recompute, and outputs with text, token ids, finish reason,
cached tokens, logprobs and timings."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from attnzoo.engine.detokenizer import RequestDetokenizer
from attnzoo.engine.cache_plan import check_servable, plan_cache, sequence_bytes
from attnzoo.engine.paged_cache import PagedKVCache
from attnzoo.engine.model_runner import ModelRunner
from attnzoo.engine.request import Request
from attnzoo.engine.sampling import Sampler, SamplingParams, SamplingRow, make_generator
from attnzoo.engine.scheduler import Scheduler, SchedulerConfig
from attnzoo.engine.tp import CacheArgs, EngineDeadError, TensorParallelGroup
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.registry import (
    DEFAULT_MODEL,
    auto_quantization,
    default_device,
    load_model,
    resolve,
    resolve_dtype,
)
from attnzoo.ops.attention.invariant import KEY_BLOCK
from attnzoo.ops.batch_invariant import check_gemm_invariance

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


# The default KV budget: what max_num_seqs sequences at the full context need, but at most this share of
# the memory available at start-up (never less than one full-context sequence). Host RAM is shared with
# everything else on the machine, and the pool is paid for as it fills, so a cap that a busy server can
# really fill must be one the machine can spare; a larger budget is a flag away (kv_cache_memory/fraction).
DEFAULT_KV_CACHE_FRACTION = 0.1


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV cache: free GPU memory, or the host's MemAvailable, lowered to the cgroup's
    remaining limit inside a container (whose /proc/meminfo shows the host)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = 4 << 30  # no /proc: a guess that keeps the default budget small
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            free = min(free, int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return max(free, 0)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def kv_budget(fixed: int, per_seq: int, max_num_seqs: int, max_model_len: int, kv_cache_memory: int | None,
              kv_cache_fraction: float | None, available: int | None) -> tuple[int, str]:
    """The KV budget in bytes and, for the start-up log, where it came from. fixed + n * per_seq bytes hold
    n sequences of max_model_len tokens (`sequence_bytes`); available is None when kv_cache_memory is given."""
    if kv_cache_memory is not None:
        return kv_cache_memory, f"kv_cache_memory {_gib(kv_cache_memory)}"
    if kv_cache_fraction is not None:
        return int(available * kv_cache_fraction), f"kv_cache_fraction {kv_cache_fraction:g} of {_gib(available)}"
    cap = int(available * DEFAULT_KV_CACHE_FRACTION)
    n = max_num_seqs if per_seq == 0 else max(1, min(max_num_seqs, (cap - fixed) // per_seq))
    share = f"{DEFAULT_KV_CACHE_FRACTION:.0%} of {_gib(available)} available"
    fits = f"within {share}" if fixed + n * per_seq <= cap else f"more than {share}: one sequence is the least"
    return fixed + n * per_seq, (f"default: {n} sequence{'s' * (n > 1)} of {max_model_len} tokens, max_num_seqs "
                                 f"{max_num_seqs}, {fits}")


def _check_count(name: str, value: object, lo: int, hi: int | None = None, hi_is: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}{hi_is}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


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
                 detokenize: bool = True):
        """kv_cache_memory (bytes) or kv_cache_fraction (of the memory available at start-up) sets the KV
        budget; by default it is what max_num_seqs sequences of max_model_len tokens need, capped at
        DEFAULT_KV_CACHE_FRACTION of the available memory and never less than one such sequence.
        max_model_len caps the context the engine serves (default and maximum: the model's).
        deterministic=True: every request gets the same tokens whatever runs beside it (batch-invariant
        matmuls and attention, docs/deterministic.md); CPU only, softmax-attention models only, slower.
        tensor_parallel_size=N > 1: N processes (this one and N-1 workers) each hold 1/N of the heads, MLP
        channels, vocabulary and KV cache (engine/tp.py, the rules in models/sharding.py); the model must be a
        transformers checkpoint directory; `close()` stops the workers.
        quantization ("auto", "none", "int4", "int8"; `models.registry.resolve_quantization`): weight-only
        int4/int8 linears when loading by name or path. "auto" (the default) keeps a GGUF file's 4-bit weights
        as int4 on the CPU when max_num_seqs is 1, where that decodes faster, and loads float weights for
        batches, CUDA, deterministic mode and tensor parallelism (`models.registry.auto_quantization`; README
        "Quantised weights"); a passed-in model runs as it is.
        detokenize=False: outputs carry token ids only (text stays "") and stop strings are the caller's to
        apply (the server's API process does both, and aborts a sequence that meets one)."""
        for name, value, lo in (("page_size", page_size, 1), ("max_num_seqs", max_num_seqs, 1),
                                ("max_num_batched_tokens", max_num_batched_tokens, 1)):
            _check_count(name, value, lo)
        if kv_cache_memory is not None and kv_cache_fraction is not None:
            raise ValueError("give kv_cache_memory or kv_cache_fraction, not both")
        if kv_cache_memory is not None:
            _check_count("kv_cache_memory (bytes)", kv_cache_memory, 1)
        if kv_cache_fraction is not None and (isinstance(kv_cache_fraction, bool) or not (
                isinstance(kv_cache_fraction, (int, float)) and 0 < kv_cache_fraction <= 1)):
            raise ValueError(f"kv_cache_fraction must be a number in (0, 1], got {kv_cache_fraction!r}")
        # the model and its KV cache live on one device: CUDA when present (paged decode runs the Triton
        # kernel there), else the CPU. dtype ("auto" decided for that device) applies when loading by name
        # or path; a passed-in model keeps its own
        self.device = torch.device(device) if device is not None else default_device()
        self.tp: TensorParallelGroup | None = None
        self._finalizer: weakref.finalize | None = None
        _check_count("tensor_parallel_size", tensor_parallel_size, 1)
        if tensor_parallel_size > 1:
            if quantization in ("int4", "int8"):
                raise ValueError("tensor parallelism shards float weights: use quantization='none' (or 'auto')")
            self.model = self._start_tensor_parallel(model, dtype, tensor_parallel_size, deterministic)
        else:
            if isinstance(model, DecoderLM):
                if quantization not in ("auto", "none"):
                    raise ValueError("quantization applies when LLM loads the model; quantise a loaded model with "
                                     "attnzoo.layers.quant.quantize_model")
            else:
                if deterministic and quantization in ("int4", "int8"):
                    raise ValueError("deterministic mode needs float weights (its batch-invariant matmuls): "
                                     "use quantization='none'")
                model = load_model(model, dtype, self.device,
                                   "none" if deterministic else auto_quantization(quantization, max_num_seqs))
            self.model = model.to(self.device)
        self.tokenizer = self.model.tokenizer
        cfg = self.model.config
        if max_model_len is not None:  # longer than the model's own would run RoPE past what it was built for
            _check_count("max_model_len", max_model_len, 1, cfg.max_position_embeddings, " (the model's context)")
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        dtype = self.model.embed_tokens.weight.dtype
        specs = self.model.cache_specs()
        check_servable(specs)
        # with prefix caching, a model with recurrent layers keeps up to one snapshot of its states per
        # sequence it can run (docs/engine.md, "Prefix caching for hybrids")
        # (one process only: under tensor parallelism the workers' state shards would need the same copies)
        snapshots = max_num_seqs if enable_prefix_caching and tensor_parallel_size == 1 else 0
        fixed, per_seq = sequence_bytes(specs, page_size, dtype, max_num_seqs, max_num_batched_tokens,
                                        self.max_model_len, snapshots)
        available = None if kv_cache_memory is not None else available_memory(self.device)
        budget, why = kv_budget(fixed, per_seq, max_num_seqs, self.max_model_len, kv_cache_memory,
                                kv_cache_fraction, available)
        plan = plan_cache(specs, page_size, dtype, budget, max_num_seqs, max_num_batched_tokens, self.max_model_len,
                          snapshots)
        self.kv = PagedKVCache(specs, plan.num_pages, page_size, dtype, enable_prefix_caching, self.device,
                               num_state_slots=plan.state_slots, window_pages=plan.window_pages,
                               num_snapshots=plan.snapshot_slots,
                               keys_pages=max_num_seqs * -(-self.max_model_len // page_size) + 1)
        log.info("KV cache: %d pages x %d tokens = %d tokens, %s of %s (%s)%s", plan.num_pages, page_size,
                 plan.num_pages * page_size, _gib(plan.total_bytes), str(dtype).removeprefix("torch."), why,
                 "; memory is taken as pages fill" if self.device.type == "cpu" else "")
        if available is not None and plan.total_bytes > available:
            log.warning("the KV cache can grow to %s but only %s is available now: long or many sequences may "
                        "exhaust memory; lower max_model_len or max_num_seqs", _gib(plan.total_bytes), _gib(available))
        if plan.window_pages or plan.state_slots:
            for line in self.kv.describe():
                log.info("  %s", line)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), self.kv)
        length = min(8192, self.max_model_len)
        log.info("fits %d concurrent sequences of %d tokens", self.max_concurrent_sequences(length), length)
        self.deterministic, self.detokenize = deterministic, detokenize
        if deterministic:
            check_deterministic(self.model, self.device, page_size)
        self.runner = ModelRunner(self.model, self.kv, deterministic)
        if self.tp is not None:   # the workers build their shards of the cache with this plan
            self.kv.fresh = ([], [])
            self.tp.start_caches(CacheArgs(plan.num_pages, page_size, plan.state_slots, plan.window_pages))
        self.sampler = Sampler(torch.Generator().manual_seed(seed))
        self.eos_token_ids = list(self.tokenizer.eos_token_ids) if self.tokenizer else list(cfg.eos_token_ids)
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count()

    def _start_tensor_parallel(self, model: str | os.PathLike | DecoderLM, dtype: str | torch.dtype, size: int,
                               deterministic: bool) -> DecoderLM:
        if isinstance(model, DecoderLM):
            raise ValueError("tensor_parallel_size > 1 loads each rank's shard from the checkpoint: pass the path "
                             "of a transformers directory, not a loaded model")
        if deterministic:
            raise ValueError("deterministic mode runs in one process: it does not combine with tensor_parallel_size "
                             "> 1")
        path = resolve(model)
        if not (path.is_dir() and (path / "config.json").exists()):
            raise ValueError(f"tensor_parallel_size > 1 needs a transformers checkpoint directory (config.json + "
                             f"safetensors); {path} is not one")
        self.tp = TensorParallelGroup(path, size, resolve_dtype(dtype, self.device), self.device)
        self.device = self.tp.device
        # an engine only dropped (del, garbage-collected, interpreter exit) still stops its workers and leaves the
        # process group, so that the next engine in this process can start; the callback holds the group, never
        # this engine (which would then never be collected). close() runs it too, once.
        self._finalizer = weakref.finalize(self, self.tp.close)
        return self.tp.model

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
            raise ValueError(f"prompt has {len(ids)} tokens; the context (max_model_len) is {self.max_model_len} "
                             f"tokens")
        params.validate(vocab_size=vocab, max_model_len=self.max_model_len, prompt_len=len(ids))
        short = self.kv.pages_short(len(ids) + params.max_tokens, self.scheduler.cfg.max_num_batched_tokens)
        if short:
            need, have = short
            raise ValueError(f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) needs {need} KV "
                             f"pages but the cache holds {have}; lower max_tokens or raise kv_cache_memory")
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._groups:
            raise ValueError(f"request_id {rid!r} is already in use")
        children = []
        for i in range(params.n):
            p = params if params.n == 1 else _child_params(params, i)
            children.append(Request(f"{rid}#{i}" if params.n > 1 else rid, list(ids), p,
                                    generator=make_generator(p),
                                    detokenizer=RequestDetokenizer(self.tokenizer, p.stop or [], ids)
                                    if self.tokenizer and self.detokenize else None))
        self._groups[rid] = _Group(rid, children, [""] * len(children))
        for r in children:
            self.scheduler.add(r)
        return rid

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or only its completion `index`) now and free its pages; unknown or finished ids
        are ignored."""
        group = self._groups.get(request_id)
        for i, r in enumerate(group.children if group else []):
            if not r.finished and index in (None, i):
                self.scheduler.finish(r, "abort")

    def _abort_all(self) -> None:
        for group in list(self._groups.values()):
            for r in group.children:
                if not r.finished:
                    self.scheduler.finish(r, "abort")
        self._groups.clear()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample, check stops. Returns snapshots of the request groups that
        changed (finished groups are then forgotten)."""
        if self.tp is not None and self.tp.dead is not None:
            raise EngineDeadError(self.tp.dead)
        plan = self.scheduler.schedule()
        if plan.empty:
            return self._collect(set())
        if self.tp is None:
            logits, sampling = self.runner.run(plan)
        else:
            inputs, sampling = self.runner.prepare(plan)
            try:
                logits = self.tp.run(self.runner, inputs)
            except EngineDeadError:
                self._abort_all()   # pending requests end; their pages go back before the error propagates
                raise
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
            text = "" if r.detokenizer is None else r.detokenizer.finish() if r.finished else r.detokenizer.text
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


def check_deterministic(model: DecoderLM, device: torch.device, page_size: int) -> None:
    """Raise ValueError unless deterministic serving can hold its promise for this model here."""
    if device.type != "cpu":
        raise ValueError("deterministic mode runs on the CPU only (its batch-invariant GEMMs and attention are "
                         "CPU forms)")
    unsupported = sorted({type(layer.attn).__name__ for layer in model.layers
                          if not getattr(layer.attn, "batch_invariant", False)})
    if unsupported:
        raise ValueError(f"deterministic mode supports softmax-attention layers (full, sliding, sinks; dense or MoE "
                         f"MLPs); this model has {', '.join(unsupported)}")
    if KEY_BLOCK % page_size:
        raise ValueError(f"deterministic mode needs a page_size dividing {KEY_BLOCK}, got {page_size}")
    shapes = sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    check_gemm_invariance(shapes, model.embed_tokens.weight.dtype, trials=1)


def _child_params(p: SamplingParams, i: int) -> SamplingParams:
    from dataclasses import replace
    return replace(p, n=1, seed=None if p.seed is None else p.seed + i)
