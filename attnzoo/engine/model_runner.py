"""Turns a scheduled step into one model forward: packed input ids, positions, cu_seqlens, the paged
cache handle (slot mapping and gather plans built once per step, not per layer), and logits only
for the rows that sample.

`prepare` reduces a step to plain data (`StepInputs`: what every tensor-parallel rank needs to run the same
forward over its own shard of the cache), `execute` runs it; `run` is both."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from attnzoo.engine.paged_cache import PagedKVCache
from attnzoo.engine.scheduler import StepPlan
from attnzoo.engine.step import build_step
from attnzoo.layers.batch import Batch
from attnzoo.models.decoder import DecoderLM
from attnzoo.ops.batch_invariant import batch_invariant


@dataclass
class SeqView:
    """What `build_step` reads of a request: its page tables, computed tokens and state slot."""
    page_tables: list[list[int]]
    num_computed: int
    state_slot: int | None


@dataclass
class StepInputs:
    """One step as plain data (picklable: rank 0 broadcasts it to the tensor-parallel workers)."""
    ids: list[int]
    positions: list[int]
    num_new: list[int]
    seqs: list[SeqView]
    logits_rows: list[int]
    fresh_pages: list[tuple[int, list[int]]]   # pages handed out since the last step (zeroed before use)
    fresh_slots: list[int]                     # recurrent-state slots taken since the last step


class ModelRunner:
    def __init__(self, model: DecoderLM, kv: PagedKVCache, deterministic: bool = False, worker: bool = False):
        """worker: a tensor-parallel worker's runner, which zeroes the pages rank 0 handed out (`execute`)."""
        self.model, self.kv, self.deterministic, self.worker = model, kv, deterministic, worker

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits [R, V] float32, indices into plan.requests of the R requests that sample)."""
        inputs, samplers = self.prepare(plan)
        return self.execute(inputs), samplers

    def prepare(self, plan: StepPlan) -> tuple[StepInputs, list[int]]:
        ids, pos, rows, samplers = [], [], [], []
        offset = 0
        for i, (req, n) in enumerate(zip(plan.requests, plan.num_new)):
            start = req.num_computed
            ids.extend(req.token(t) for t in range(start, start + n))
            pos.extend(range(start, start + n))
            offset += n
            if start + n == req.num_tokens:   # the chunk reaches the end: this request samples
                rows.append(offset - 1)
                samplers.append(i)
        seqs = [SeqView([list(t) for t in r.page_tables], r.num_computed, r.state_slot) for r in plan.requests]
        pages, slots = self.kv.drain_fresh()
        return StepInputs(ids, pos, list(plan.num_new), seqs, rows, pages, slots), samplers

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """logits [len(inputs.logits_rows), V] float32."""
        with batch_invariant() if self.deterministic else nullcontext():
            return self._execute(inputs)

    @torch.inference_mode()
    def _execute(self, inputs: StepInputs) -> torch.Tensor:
        if self.worker:
            self.kv.zero_fresh(inputs.fresh_pages, inputs.fresh_slots)
        dev = self.kv.device
        cu = torch.zeros(len(inputs.num_new) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(inputs.num_new).cumsum(0)
        batch = Batch(positions=torch.tensor(inputs.positions, device=dev), cu_seqlens=cu.to(dev),
                      cache=build_step(self.kv, inputs.seqs, inputs.num_new),
                      logits_rows=torch.tensor(inputs.logits_rows, dtype=torch.long, device=dev))
        logits = self.model.forward_batch(torch.tensor(inputs.ids, device=dev), batch)
        return logits.float()
