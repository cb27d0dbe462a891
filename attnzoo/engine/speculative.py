"""Speculative decoding: the configuration (vLLM's `speculative_config` keys), the drafters and the adaptive
rule. A drafter proposes up to k tokens for a request whose prompt is computed; the engine appends them to
the request (`Request.spec_ids`), runs the last sampled token and the drafts as one chunk (k + 1 rows, each
writing its KV or state), and the sampler keeps the longest prefix the target agrees with plus one token of
its own (`Sampler.verify`). Rows past the kept prefix are rolled back by the engine (`verify_drafts`, below).

Every drafter here proposes one token per position (a point mass), so the acceptance rule is exact for
greedy and sampled requests alike: the output distribution is the target's, whatever the drafts.

- `ngram` (prompt lookup): the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are looked up
  in the request's earlier tokens, prompt and output; what followed their latest occurrence is the draft. An
  index per request (n-gram -> where its latest occurrence ends) is updated as tokens arrive: O(new tokens)
  per step, whatever the context length.
- `draft_model`: a smaller model with the same vocabulary decodes k tokens greedily (engine/draft_model.py).
- `mtp`: the model's own multi-token-prediction layer (DeepSeek-V3's) drafts greedily from the target's hidden
  states (engine/mtp_drafter.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from attnzoo.engine.llm import LLM
    from attnzoo.engine.scheduler import StepPlan
    from attnzoo.models.decoder import DecoderLM

METHODS = ("ngram", "draft_model", "mtp")
MAX_SPECULATIVE_TOKENS = 16   # a verify chunk is k + 1 rows per request: beyond this acceptance never pays


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None     # ngram: longest n-gram matched (default: prompt_lookup_min or 4)
    prompt_lookup_min: int | None = None     # ngram: shortest (default: prompt_lookup_max or 2, at most max)
    model: "str | DecoderLM | None" = None   # draft_model: path or name of the smaller model, or a loaded one
    adaptive: bool = True                    # lower k per request while its drafts are rejected

    @classmethod
    def parse(cls, spec: "SpeculativeConfig | dict[str, Any] | str | None") -> "SpeculativeConfig | None":
        """From a dict (LLM's speculative_config) or JSON text (--speculative-config); None stays None. Every
        problem is one ValueError naming the key and what is allowed."""
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; allowed: {sorted(known)}")
        if spec.get("method") not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)}, got {spec.get('method')!r}")
        if "num_speculative_tokens" not in spec:
            raise ValueError("speculative_config.num_speculative_tokens is required (1 to "
                             f"{MAX_SPECULATIVE_TOKENS})")
        cfg = cls(**spec)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def count(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"speculative_config.{name} must be an integer in [{lo}, {hi}], got {v!r}")

        count("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
        if self.method == "ngram":
            if self.prompt_lookup_max is None:
                self.prompt_lookup_max = max(4, self.prompt_lookup_min or 0)
            if self.prompt_lookup_min is None:
                self.prompt_lookup_min = min(2, self.prompt_lookup_max)
            count("prompt_lookup_max", 1, 64)
            count("prompt_lookup_min", 1, self.prompt_lookup_max)
        elif self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
            raise ValueError(f"speculative_config.prompt_lookup_min/max apply to method 'ngram', not {self.method!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config.model (a path or model name) is required for method 'draft_model'")
        if self.method != "draft_model" and self.model is not None:
            raise ValueError(f"speculative_config.model applies to method 'draft_model', not {self.method!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be true or false, got {self.adaptive!r}")


@dataclass
class NgramIndex:
    """One request's n-gram index: for each n, n-gram -> end of its latest occurrence among the tokens indexed
    so far. The newest position is indexed only once a later token exists, so a lookup of the current suffix
    finds an earlier occurrence, never itself."""
    n_min: int
    n_max: int
    maps: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    indexed: int = 0          # n-grams ending at positions <= indexed are in the maps

    def propose(self, tokens: list[int], k: int) -> list[int]:
        end = len(tokens) - 1
        for e in range(max(self.indexed + 1, self.n_min), end + 1):   # n-grams ending before the last token
            for n in range(self.n_min, min(self.n_max, e) + 1):
                self.maps.setdefault(n, {})[tuple(tokens[e - n:e])] = e
        self.indexed = max(self.indexed, end)
        for n in range(min(self.n_max, len(tokens)), self.n_min - 1, -1):
            hit = self.maps.get(n, {}).get(tuple(tokens[len(tokens) - n:]))
            if hit is not None:
                return tokens[hit:hit + k]
        return []


@dataclass
class AdaptiveK:
    """Per request (`Throttle` is the engine-wide rule): how many tokens to draft next. Starts at k; each verify moves the running acceptance rate
    (an exponential average) and k follows it: a request whose drafts keep failing drafts fewer, then none for
    a while (doubling the pause while drafts keep failing), so speculation costs a free-writing request at most
    a verify row now and then."""
    k_max: int
    rate: float = 1.0
    pause: int = 0            # steps left without drafting
    backoff: int = 1

    def next_k(self) -> int:
        if self.pause > 0:
            self.pause -= 1
            return 0
        return max(1, min(self.k_max, round(self.rate * self.k_max)))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.rate = 0.7 * self.rate + 0.3 * (accepted / drafted)
        if accepted == 0 and self.rate < 0.3:
            self.pause, self.backoff = self.backoff, min(self.backoff * 2, 64)
        elif accepted:
            self.backoff = 1


@dataclass
class Throttle:
    """Engine-wide: drafting must pay in tokens per second. Decode steps are timed whole (propose, schedule,
    forward, sample, bookkeeping); an exponential average of tokens/s is kept for steps that verified drafts and
    for steps that did not. When verifying is the slower of the two, drafting pauses for `backoff` steps
    (doubling while it keeps losing, up to 1024) and is then tried again: a verify step costs more than a decode
    step (several rows through every matmul; eager where decode steps may run a compiled graph), so drafts that
    are seldom kept would otherwise make a request slower, not faster."""
    rate: dict[bool, float] = field(default_factory=dict)   # verified drafts? -> tokens/s
    samples: int = 0          # verify steps since drafting (re)started
    pause: int = 0
    backoff: int = 16
    since_plain: int = 0      # steps since the last plain decode step was timed
    PROBE_EVERY = 64          # in a batch some request drafts nearly every step: pause briefly to time plain steps

    @property
    def paused(self) -> bool:
        return self.pause > 0

    def tick(self) -> None:
        """Once per engine step, before drafting."""
        self.since_plain += 1
        if self.pause == 0 and self.since_plain > self.PROBE_EVERY:
            self.pause, self.since_plain = 2, 0   # two plain steps: a fresh baseline, then drafting resumes
            return
        if self.pause > 0:
            self.pause -= 1
            if self.pause == 0:   # measure afresh: the workload may have changed meanwhile
                self.rate.pop(True, None)
                self.samples = 0

    def observe(self, verified: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        r = tokens / seconds
        self.rate[verified] = r if verified not in self.rate else 0.8 * self.rate[verified] + 0.2 * r
        self.samples += verified
        if not verified:
            self.since_plain = 0
        if verified and self.samples >= 4 and False in self.rate:
            if self.rate[True] < self.rate[False]:
                self.pause, self.backoff = self.backoff, min(self.backoff * 2, 1024)
            else:
                self.backoff = 16


@dataclass
class _DraftState:
    index: NgramIndex | None
    k: AdaptiveK


class Drafter:
    """Proposes each step's drafts for the running requests whose prompt is computed (`Request.spec_ids`) and
    hears back how many were kept. The number drafted never lets a request pass max_tokens or the context."""

    def __init__(self, cfg: SpeculativeConfig, max_model_len: int):
        self.cfg, self.max_model_len = cfg, max_model_len
        self.throttle = Throttle()

    def budget(self, req: Any) -> int:
        if self.cfg.adaptive and self.throttle.paused:
            return 0
        st = self.state(req)
        k = st.k.next_k() if self.cfg.adaptive else self.cfg.num_speculative_tokens
        # the token after the drafts is the target's own: drafting the last allowed token would be wasted
        return max(0, min(k, req.params.max_tokens - len(req.output_ids) - 1,
                          self.max_model_len - req.num_tokens - 1))

    def state(self, req: Any) -> _DraftState:
        if req.drafter is None:
            index = NgramIndex(self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max) \
                if self.cfg.method == "ngram" else None
            req.drafter = _DraftState(index, AdaptiveK(self.cfg.num_speculative_tokens))
        return req.drafter

    def propose(self, reqs: list[Any]) -> None:
        for r in reqs:
            k = self.budget(r)
            r.spec_ids = self.state(r).index.propose(r.all_ids(), k) if k > 0 else []

    def observe(self, req: Any, drafted: int, accepted: int) -> None:
        self.state(req).k.update(drafted, accepted)


@dataclass
class SpecStats:
    """Engine-wide counts since start (the server's Prometheus counters), and the acceptance lengths (kept
    drafts + 1, per verify) recorded since the last `take_lengths`."""
    drafted: int = 0
    accepted: int = 0
    lengths: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if len(self.lengths) < 1 << 16:   # bounded if nobody reads them
            self.lengths.append(accepted + 1)

    def take_lengths(self) -> list[int]:
        out, self.lengths = self.lengths, []
        return out


def make_drafter(cfg: SpeculativeConfig, model: Any, max_model_len: int, device: Any, scheduler: Any = None
                 ) -> Drafter:
    """The drafter for cfg on this target model; a method the model cannot use is a ValueError. scheduler: the
    engine's (its limits and cache size the draft model's cache)."""
    if cfg.method == "ngram":
        return Drafter(cfg, max_model_len)
    if cfg.method == "draft_model":
        from attnzoo.engine.draft_model import DraftModelDrafter
        return DraftModelDrafter(cfg, model, max_model_len, device, scheduler)
    if not len(getattr(model, "mtp", ())):   # (tensor parallelism loads none either)
        raise ValueError("speculative_config.method 'mtp': this model has no multi-token-prediction layers "
                         "(DeepSeek-V3 checkpoints with num_nextn_predict_layers and their weights; other "
                         "families' MTP layers are not loaded yet)")
    from attnzoo.engine.mtp_drafter import MTPDrafter
    return MTPDrafter(cfg, model, max_model_len, device, scheduler)


def verify_drafts(llm: "LLM", plan: "StepPlan", sampling: list[int], logits: torch.Tensor, grammars: list) -> list:
    """LLM._sample for a step with drafts: the verify rows decide how many drafts stay (`Sampler.verify`); the rest
    are rolled back: KV-like caches just count fewer computed tokens (later steps overwrite the rejected rows),
    recurrent states go back to their stash and the kept tokens are recomputed with the next step's."""
    from attnzoo.engine.cache_tensors import UnstashState
    from attnzoo.engine.sampling import SamplingRow
    reqs = [plan.requests[i] for i in sampling]
    rows = [SamplingRow(r.params, r.generator, r.prompt_ids, r.output_ids + r.spec_ids[:j])
            for r in reqs for j in range(len(r.spec_ids) + 1)]
    allowed = llm.structured.allowed(grammars, [r.spec_ids for r in reqs]) if any(grammars) else None
    emitted, result = llm.sampler.verify(logits, rows, llm.eos_token_ids, [r.spec_ids for r in reqs], allowed)
    out, i = [], 0
    for k, toks in zip(sampling, emitted):
        r = plan.requests[k]
        drafted, accepted = len(r.spec_ids), len(toks) - 1
        if drafted:
            rejected = drafted - accepted
            if rejected and r.state_slot is not None:   # back to the state before this step's chunk
                llm.kv.ops.append(UnstashState(r.state_slot))
                r.num_computed -= plan.num_new[k]
            else:
                r.num_computed -= rejected
            r.num_draft_tokens += drafted
            r.num_accepted_tokens += accepted
            llm.drafter.observe(r, drafted, accepted)
            llm.spec_stats.record(drafted, accepted)
            r.spec_ids = []
        out.append((r, toks, result.logprobs[i:i + len(toks)]))
        i += len(toks)
    return out
