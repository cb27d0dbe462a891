"""Draft-model speculative decoding: a smaller model with the target's vocabulary proposes each request's next
k tokens greedily (a point mass, which `Sampler.verify` accepts exactly).

The drafter owns a paged cache of its own (prefix caching off, eager steps) and, per target request, a shadow
`Request` whose tokens follow the target's. Each step a shadow first catches up with the tokens the target
has added since the last step; its own drafts that the target did not keep are rolled back by counting fewer
computed tokens (later steps overwrite those rows), as the engine does. Then one batched forward computes
every shadow's uncomputed tokens and samples the first draft, and k - 1 more batched one-token forwards
sample the rest. Drafts are optional: a shadow that cannot get pages, or does not catch up within the step's
token budget (a new prompt longer than max_num_batched_tokens: it goes on next step), drafts nothing, and no
request ever fails for it. A shadow whose request is not among those the next step drafts for (finished,
aborted, preempted: the engine passes the running requests whose prompt is computed) is freed then."""

from __future__ import annotations

import logging
from typing import Any

from attnzoo.engine.cache_plan import check_servable, plan_cache, recurrent_specs, sequence_bytes
from attnzoo.engine.memory import gib
from attnzoo.engine.model_runner import ModelRunner
from attnzoo.engine.paged_cache import PagedKVCache
from attnzoo.engine.request import Request
from attnzoo.engine.sampling import SamplingParams
from attnzoo.engine.scheduler import Scheduler, StepPlan
from attnzoo.engine.speculative import Drafter, SpeculativeConfig
from attnzoo.engine.startup import load_local
from attnzoo.models.decoder import DecoderLM

log = logging.getLogger("attnzoo.engine")
PAGE_SIZE = 16
_GREEDY = SamplingParams(temperature=0)   # shadows never sample through the Sampler: argmax of the logits


def check_draft(draft: DecoderLM, target: DecoderLM) -> None:
    """Raise ValueError unless `draft` can propose tokens for `target`: the same token ids meaning the same
    text, and only caches a draft can roll back by counting (no recurrent state)."""
    dv, tv = draft.config.vocab_size, target.config.vocab_size
    if dv != tv:
        raise ValueError(f"the draft model's vocabulary has {dv} tokens, the target's {tv}: a draft model must "
                         "share the target's vocabulary")
    a, b = draft.tokenizer, target.tokenizer
    if a is not None and b is not None and a.tok.get_vocab(with_added_tokens=True) != \
            b.tok.get_vocab(with_added_tokens=True):
        raise ValueError("the draft model's tokenizer differs from the target's (the same vocabulary size, other "
                         "tokens): a draft model must share the target's tokenizer")
    specs = draft.cache_specs()
    check_servable(specs)
    layers = sorted(recurrent_specs(specs))
    if layers:
        raise ValueError(f"draft models must be attention-only for now: the draft model's layers {layers} keep a "
                         "recurrent state")


class DraftModelDrafter(Drafter):
    def __init__(self, cfg: SpeculativeConfig, target: DecoderLM, max_model_len: int, device: Any,
                 scheduler: Scheduler):
        """cfg.model: a path or name (loaded like the LLM loads its model, in the target's dtype) or a loaded
        DecoderLM. The cache holds max_num_seqs sequences of max_model_len tokens, but no more tokens than the
        target's own cache (the shadows hold about what the target's requests hold)."""
        super().__init__(cfg, max_model_len)
        self.model = load_local(cfg.model, target.embed_tokens.weight.dtype, device, "auto",
                                scheduler.cfg.max_num_seqs, False)
        check_draft(self.model, target)
        self._start(scheduler, "draft model")

    def _start(self, scheduler: Scheduler, what: str) -> None:
        """self.model's cache and eager runner, and no shadows yet."""
        seqs, tokens = scheduler.cfg.max_num_seqs, scheduler.cfg.max_num_batched_tokens
        # positions past the draft's own context are not drafted
        self.draft_len = min(self.max_model_len, self.model.config.max_position_embeddings)
        specs, dtype = self.model.cache_specs(), self.model.embed_tokens.weight.dtype
        # a sliding table also holds one step's catch-up and every shadow's drafts beyond its window
        chunk = tokens + seqs * self.cfg.num_speculative_tokens
        fixed, per_seq = sequence_bytes(specs, PAGE_SIZE, dtype, seqs, chunk, self.draft_len)
        full = scheduler.kv.tables[0] if scheduler.kv.tables and scheduler.kv.tables[0].window is None else None
        n = seqs if full is None else max(1, min(seqs, -(-full.pool.capacity * scheduler.kv.page_size
                                                         // self.draft_len)))
        plan = plan_cache(specs, PAGE_SIZE, dtype, fixed + n * per_seq, seqs, chunk, self.draft_len)
        self.kv = PagedKVCache(specs, plan.num_pages, PAGE_SIZE, enable_prefix_caching=False,
                               window_pages=plan.window_pages)
        log.info("%s cache: %d pages x %d tokens, %s", what, plan.num_pages, PAGE_SIZE, gib(plan.total_bytes))
        self.runner = ModelRunner(self.model, self.kv.layout, kv=self.kv)
        self.step_tokens = tokens
        self.shadows: dict[str, tuple[Request, Request]] = {}   # request id -> (the target request, its shadow)

    def propose(self, reqs: list[Request]) -> None:
        self._drop_shadows({r.request_id: r for r in reqs})
        todo = []
        for r in reqs:
            r.spec_ids = []
            k = min(self.budget(r), self.draft_len - r.num_tokens)
            if k > 0:
                todo.append((r, self._sync(r), k))
        self._draft(todo)

    def _drop_shadows(self, live: dict[str, Request]) -> None:
        for rid, (target, shadow) in list(self.shadows.items()):
            if live.get(rid) is not target:   # finished, aborted, preempted (or its id reused)
                self.kv.free(shadow)
                del self.shadows[rid]

    def _draft(self, todo: list[tuple[Request, Request, int]]) -> None:
        """(request, its synced shadow, k): k drafts for each request (fewer where pages or the step's budget
        run out): one batched forward catches the shadows up and drafts one token, one-token forwards the rest."""
        plan, budget = StepPlan([], []), self.step_tokens
        for r, s, _ in todo:   # catch up (the whole rest of a shadow, or a chunk of it) and draft one token
            n = min(self._ready(r, s), budget)
            if n and self.kv.allocate(s, s.num_computed + n):
                plan.requests.append(s)
                plan.num_new.append(n)
                budget -= n
        want = {id(s): k for _, s, k in todo}
        drafting = self._forward(plan)
        while drafting:        # one more draft per shadow and forward, each computing the shadow's last draft
            plan = StepPlan([], [])
            for s in drafting:
                if len(s.output_ids) < want[id(s)] and self.kv.allocate(s, s.num_tokens):
                    plan.requests.append(s)
                    plan.num_new.append(1)
            drafting = self._forward(plan)
        for r, s, k in todo:
            r.spec_ids = s.output_ids[:k]

    def _ready(self, r: Request, s: Request) -> int:
        """How many of shadow s's uncomputed tokens it can compute now: all (a draft model reads tokens only)."""
        return s.num_tokens - s.num_computed

    def _sync(self, r: Request) -> Request:
        """r's shadow, holding r's tokens; rows past what the shadow and r agree on count as not computed."""
        entry = self.shadows.get(r.request_id)
        if entry is None:
            s = Request(r.request_id, r.all_ids(), _GREEDY)
            self.shadows[r.request_id] = (r, s)
            return s
        s = entry[1]
        # the shadow's prompt is r's tokens at the last step (r's tokens only grow); its outputs are its drafts
        new = r.output_ids[len(s.prompt_ids) - len(r.prompt_ids):]
        agree = 0
        while agree < min(len(new), len(s.output_ids)) and new[agree] == s.output_ids[agree]:
            agree += 1
        # at least the last token is recomputed: its logits give the first draft
        s.num_computed = min(s.num_computed, len(s.prompt_ids) + agree, r.num_tokens - 1)
        s.prompt_ids.extend(new)
        s.output_ids = []
        self.kv.release_window(s)   # only here, where computed tokens are the target's and never roll back
        return s

    def _forward(self, plan: StepPlan) -> list[Request]:
        """Run plan on the draft model; each shadow whose chunk reached its end appends its greedy token. Returns
        those shadows."""
        if plan.empty:
            return []
        logits, sampling = self.runner.run(plan)
        for s, n in zip(plan.requests, plan.num_new):
            s.num_computed += n
        drafted = [plan.requests[i] for i in sampling]
        for s, tok in zip(drafted, logits.argmax(-1).tolist()):
            s.output_ids.append(tok)
        return drafted

    def check_integrity(self) -> None:
        """No draft-cache page leaked or double-owned."""
        self.kv.check_integrity([s for _, s in self.shadows.values()])
