"""Turns a scheduled step into one model forward: packed input ids, positions, cu_seqlens, the paged
cache handle (slot mapping and gather plans built once per step, not per layer), and logits only
for the rows that sample (with `want_hidden`, also every row's last-layer output: the MTP drafter's input).

Every rank has a runner, and each runner owns its rank's cache tensors (`CacheTensors`: its head shard).
`prepare` (rank 0, which holds the page accounting) reduces a step to plain data (`StepInputs`: the
sequences' page tables and the cache instructions recorded since the last step), `execute` (every rank,
the same path) applies the instructions to its tensors and runs the forward; `run` is both."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from attnzoo.engine.cache_tensors import CacheLayout, CacheOp, CacheTensors
from attnzoo.engine.graph import DecodeGraph, unsupported
from attnzoo.engine.paged_cache import PagedKVCache
from attnzoo.engine.scheduler import StepPlan
from attnzoo.engine.step import SeqView, build_step
from attnzoo.layers.batch import Batch
from attnzoo.models.decoder import DecoderLM
from attnzoo.ops.batch_invariant import batch_invariant
from attnzoo.ops.extension import HAVE_KERNEL, KERNEL_ERROR

log = logging.getLogger("attnzoo.engine")


@dataclass
class StepInputs:
    """One step as plain data (picklable: rank 0 broadcasts it to the tensor-parallel workers)."""
    ids: list[int]
    positions: list[int]
    num_new: list[int]
    seqs: list[SeqView]
    logits_rows: list[int]
    cache_ops: list[CacheOp]    # pages and state slots to zero, states to snapshot or restore: before the forward


class ModelRunner:
    def __init__(self, model: DecoderLM, layout: CacheLayout, deterministic: bool = False,
                 kv: PagedKVCache | None = None):
        """Builds this rank's cache tensors for `layout` (rank 0's plan) from the model's own cache specs;
        kv: the page accounting, on rank 0 (the one runner that prepares steps)."""
        weight = model.embed_tokens.weight
        self.model, self.deterministic, self.kv = model, deterministic, kv
        self.cache = CacheTensors(model.cache_specs(), layout, weight.dtype, weight.device)
        self.graph: DecodeGraph | None = None
        # keep each eager forward's last-layer output at every row in `hidden` (the MTP drafter reads it)
        self.want_hidden = False
        self.hidden: torch.Tensor | None = None

    def start_graph(self, max_rows: int, max_model_len: int) -> str | None:
        """Let the compiled decode step take over (engine/graph.py: its graphs compile in the background once
        eager decode steps have needed them a while); max_rows: the most rows a step that can run on it has (a
        decode row per sequence, plus its drafts when drafting); returns why not, if it cannot."""
        why = unsupported(self.model, self.cache)
        if why is None and self.cache.device.type == "cpu" and not HAVE_KERNEL:
            why = f"attnzoo's C++ kernels are not built ({KERNEL_ERROR})"
        if why is not None:
            log.info("decode steps run eagerly: %s", why)
            return why
        self.graph = DecodeGraph(self.model, self.cache, max_rows, max_model_len)
        return None

    def run(self, plan: StepPlan) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits [R, V] float32, indices into plan.requests of the requests that sample): a sampling
        request owns 1 + len(spec_ids) consecutive rows (its drafts' verify rows)."""
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
            if start + n == req.num_tokens + len(req.spec_ids):   # the chunk reaches the end: it samples
                rows.extend(range(offset - 1 - len(req.spec_ids), offset))   # and verifies its drafts
                samplers.append(i)
        seqs = [SeqView([list(t) for t in r.page_tables], r.num_computed, r.state_slot) for r in plan.requests]
        return StepInputs(ids, pos, list(plan.num_new), seqs, rows, self.kv.take_ops()), samplers

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """logits [len(inputs.logits_rows), V] float32."""
        with batch_invariant() if self.deterministic else nullcontext():
            return self._execute(inputs)

    @torch.inference_mode()
    def _execute(self, inputs: StepInputs) -> torch.Tensor:
        self.cache.apply(inputs.cache_ops)
        if self.graph is not None and not self.want_hidden and len(inputs.logits_rows) == len(inputs.ids):
            # every row samples: a decode step (one row per sequence) or a verify step (a sequence's last token and
            # its drafts). The compiled graph runs either once it is ready: its attention op writes every row's K/V
            # before any row attends, each row over its own key count, so a sequence's rows are causal among
            # themselves as in a chunk
            tables = [s.page_tables for s, n in zip(inputs.seqs, inputs.num_new) for _ in range(n)]
            logits = self.graph.try_run(inputs.ids, inputs.positions, tables)
            if logits is not None:
                return logits.float()
        dev = self.cache.device
        cu = torch.zeros(len(inputs.num_new) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(inputs.num_new).cumsum(0)
        batch = Batch(positions=torch.tensor(inputs.positions, device=dev), cu_seqlens=cu.to(dev),
                      cache=build_step(self.cache, inputs.seqs, inputs.num_new),
                      logits_rows=torch.tensor(inputs.logits_rows, dtype=torch.long, device=dev))
        ids = torch.tensor(inputs.ids, device=dev)
        if self.want_hidden:
            logits, self.hidden = self.model.forward_batch(ids, batch, return_hidden=True)
        else:   # (a model's forward_batch need not take the flag: Glm5NextLM's does not)
            logits = self.model.forward_batch(ids, batch)
        return logits.float()
