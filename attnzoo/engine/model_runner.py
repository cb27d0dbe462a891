"""Turns a scheduled step into one model forward: packed input ids, positions, cu_seqlens, the paged
cache handle (slot mapping and gather plans built once per step, not per layer), and logits only
for the rows that sample."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from attnzoo.engine.paged_cache import PagedKVCache
from attnzoo.engine.scheduler import StepPlan
from attnzoo.engine.step import build_step
from attnzoo.layers.batch import Batch
from attnzoo.models.decoder import DecoderLM
from attnzoo.ops.batch_invariant import batch_invariant


class ModelRunner:
    def __init__(self, model: DecoderLM, kv: PagedKVCache, deterministic: bool = False):
        self.model, self.kv, self.deterministic = model, kv, deterministic

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits [R, V] float32, indices into plan.requests of the R requests that sample)."""
        with batch_invariant() if self.deterministic else nullcontext():
            return self._run(plan)

    @torch.inference_mode()
    def _run(self, plan: StepPlan) -> tuple[torch.Tensor, list[int]]:
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
        dev = self.kv.device
        cu = torch.zeros(len(plan.requests) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(plan.num_new).cumsum(0)
        batch = Batch(positions=torch.tensor(pos, device=dev), cu_seqlens=cu.to(dev),
                      cache=build_step(self.kv, plan.requests, plan.num_new),
                      logits_rows=torch.tensor(rows, dtype=torch.long, device=dev))
        logits = self.model.forward_batch(torch.tensor(ids, device=dev), batch)
        return logits.float(), samplers
