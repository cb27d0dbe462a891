"""MTP speculative decoding: the model's own multi-token-prediction module (DeepSeek-V3's, models/mtp.py)
proposes each request's next k tokens greedily (a point mass, which `Sampler.verify` accepts exactly: the
output is the target's whatever the module's weights).

It runs as the draft model does (engine/draft_model.py: per request a shadow `Request`, its own paged cache with
prefix caching off, eager steps), with one more input: MTP position i reads token t_{i+1} and the target's
hidden state h_i and predicts t_{i+2}. So a shadow holds the request's tokens shifted by one, and it computes
position i only once the target has computed position i and kept it. The target's runner keeps the last
layer's output at every row (`ModelRunner.want_hidden`, so its steps run eagerly), `on_forward` keeps each
request's rows from the first position its shadow has yet to read, and the shadow reads them as it catches up
(in prefill too, so what is kept stays about one step's rows). A verify step's rejected rows lie at or past
the request's num_computed: they are never read, and the step that recomputes those positions replaces them.

The catch-up ends at position n - 2 of an n-token request (t_{n-1} with h_{n-2}) and its logits give the
first draft. Further drafts chain, as vLLM's do for more speculative tokens than MTP modules: the previous
draft paired with the module's own output at the previous position in place of h. Those chained rows are
recomputed from the target's hidden states once it has computed them.

A request whose hidden states are missing for positions its shadow has not read drafts nothing and never
fails: its prompt hit the target's prefix cache (those positions were never computed here; vLLM keeps the MTP
layer's KV in the target's prefix-cached pages, not built here), or its recompute after a preemption did.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from attnzoo.engine.draft_model import DraftModelDrafter
from attnzoo.engine.request import Request, Status
from attnzoo.engine.sampling import SamplingParams
from attnzoo.engine.scheduler import Scheduler, StepPlan
from attnzoo.engine.speculative import Drafter, SpeculativeConfig
from attnzoo.layers import Batch
from attnzoo.models.decoder import DecoderLM

# h_i is the main model's output after its final norm, as vLLM feeds DeepSeek-V3's MTP (DeepseekV2Model.forward
# ends in self.norm, and deepseek_mtp reads what it returns); False: before it, the report's wording read
# literally (models/mtp.py)
POST_NORM = True
_GREEDY = SamplingParams(temperature=0)   # shadows never sample through the Sampler: argmax of the logits


class MTPModel:
    """model.mtp[0] as the drafter's ModelRunner drives a model: ids and a `Batch` in, logits out. The hidden
    state paired with each row is set in `hidden` right before each run."""

    def __init__(self, target: DecoderLM):
        self.mtp, self.config, self.embed_tokens = target.mtp[0], target.config, target.embed_tokens
        self.hidden: torch.Tensor | None = None   # [N, H]: one per row of the next run

    def cache_specs(self) -> list[Any]:
        # the block is layer num_layers of the main model's numbering (its attention stores under that index);
        # the layers before it keep nothing here
        return [()] * self.config.num_layers + [self.mtp.block.attn.cache_spec()]

    def forward_batch(self, ids: torch.Tensor, batch: Batch, return_hidden: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.mtp.forward_batch(self.hidden, ids, batch, return_hidden)


class MTPDrafter(DraftModelDrafter):
    def __init__(self, cfg: SpeculativeConfig, target: DecoderLM, max_model_len: int, device: Any,
                 scheduler: Scheduler):
        """target: a model with `mtp` layers (the first drafts); its cache is sized as a draft model's."""
        Drafter.__init__(self, cfg, max_model_len)
        self.model, self.target_norm = MTPModel(target), target.norm if POST_NORM else None
        self._start(scheduler, "MTP")
        self.runner.want_hidden = True   # the block's output: a chained draft's h
        # request id -> (the target request, position of the first row, the target's hidden rows from there)
        self.rows: dict[str, tuple[Request, int, torch.Tensor]] = {}
        self.chain: dict[str, torch.Tensor] = {}   # request id -> the block's output at its shadow's last row

    @torch.inference_mode()
    def on_forward(self, plan: StepPlan, hidden: torch.Tensor) -> None:
        """The target ran plan (num_computed not moved yet); hidden: its last layer's output at every row.
        Keep each request's rows from the first position its shadow reads next."""
        if self.target_norm is not None:
            hidden = self.target_norm(hidden)
        ends = itertools.accumulate(plan.num_new)
        for r, n, end in zip(plan.requests, plan.num_new, ends):
            pos, new = r.num_computed, hidden[end - n:end]
            entry = self.rows.get(r.request_id)
            if entry is not None and entry[0] is r and entry[1] <= pos <= entry[1] + len(entry[2]):
                start, rows = entry[1], torch.cat([entry[2][:pos - entry[1]], new])   # rows from pos on: stale
            else:
                start, rows = pos, new
            first = self._unread(r)
            if start > first:   # the rows before `start` never come (a prefix-cache hit): nothing to draft from
                self.rows.pop(r.request_id, None)
            else:
                self.rows[r.request_id] = (r, first, rows[first - start:].clone())

    def propose(self, reqs: list[Request]) -> None:
        for rid, (r, _, _) in list(self.rows.items()):
            if r.finished:
                del self.rows[rid]
        live = {r.request_id: r for r in reqs}
        # requests in prefill catch up too (drafting nothing), so that their prompt's rows do not pile up
        prefill = [r for r, _, _ in self.rows.values() if r.status is Status.RUNNING and r.request_id not in live]
        self._drop_shadows(live | {r.request_id: r for r in prefill})
        todo = []
        for r in reqs:
            r.spec_ids = []
            todo.append((r, self._sync(r), max(0, min(self.budget(r), self.draft_len - r.num_tokens))))
        self._draft(todo + [(r, self._sync(r), 0) for r in prefill])

    def _unread(self, r: Request) -> int:
        """The first position r's shadow reads: past its rows computed from the target's hidden states, and at
        most its last position (whose logits give the first draft: recomputed when r did not move)."""
        entry = self.shadows.get(r.request_id)
        if entry is None or entry[0] is not r:
            return 0
        s = entry[1]
        return max(0, min(s.num_computed, len(s.prompt_ids), r.num_tokens - 2))

    def _sync(self, r: Request) -> Request:
        """r's shadow: r's tokens after the first (position i holds t_{i+1}); its chained rows, which read the
        module's own output instead of h, count as not computed."""
        if r.request_id not in self.shadows:
            self.shadows[r.request_id] = (r, Request(r.request_id, [], _GREEDY))
        s = self.shadows[r.request_id][1]
        s.num_computed = self._unread(r)
        s.prompt_ids, s.output_ids = r.all_ids()[1:], []
        return s

    def _ready(self, r: Request, s: Request) -> int:
        """How many of s's positions from its num_computed on have their target hidden state kept."""
        entry = self.rows.get(r.request_id)
        if entry is None or entry[0] is not r or entry[1] > s.num_computed:
            return 0
        return max(0, min(entry[1] + len(entry[2]), r.num_computed, s.num_tokens) - s.num_computed)

    def _forward(self, plan: StepPlan) -> list[Request]:
        """Each row's h (the target's, or a chained draft's block output), then the draft model's step; keeps
        the block's output at each drafting shadow's last row for its next draft."""
        if plan.empty:
            return []
        h = []
        for s, n in zip(plan.requests, plan.num_new):
            if s.num_computed < len(s.prompt_ids):   # catch-up rows: the target's hidden states
                _, start, rows = self.rows[s.request_id]
                h.append(rows[s.num_computed - start:s.num_computed - start + n])
            else:                                    # a chained draft (one row)
                h.append(self.chain[s.request_id][None])
        self.model.hidden = torch.cat(h)
        drafted = super()._forward(plan)
        last = {id(s): end - 1 for s, end in zip(plan.requests, itertools.accumulate(plan.num_new))}
        self.chain = {s.request_id: self.runner.hidden[last[id(s)]] for s in drafted}
        return drafted
