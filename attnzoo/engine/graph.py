"""The decode step as one static function over persistent buffers, compiled whole by Inductor.

A decode-only step (every sequence adds one token and samples; or a verify step, its last token and its drafts,
every row sampling) reads its inputs from buffers allocated once per
batch bucket: the token ids, their positions and, per page table, each row's slot for the new K/V, its block
table and its key count. B rows run in the smallest bucket of the ladder 1, 2, 4, ... (capped at max_num_seqs)
that holds them; a padded row has no slot (nothing is written) and no keys (its output is zeros and is
dropped), so it never changes a real row. The function has no Python-level branching on the data:
`torch.compile(fullgraph=True, cpp_wrapper)` makes it one graph whose attention is the `attnzoo::paged_decode`
op (one call per layer) and whose norms, RoPE and activations are fused; the Python left per token is the buffer
fill and one call. Bucket 1 gets a graph of its own (static shapes); the buckets above it share one graph whose
batch size is symbolic, so two compiles cover the ladder. The same bucketed static step is what a CUDA graph
would capture (not written: no GPU is lent to this project now).

Compiling takes tens of seconds to minutes, so it never delays an answer: once COMPILE_AFTER decode steps have
needed a graph it is queued (`try_run` -> `request`), a background thread compiles it (logged when it starts and when it is
ready) while the eager engine serves, and from then on those buckets run compiled. Models whose layers keep
more than plain K/V (latents, indexer keys, recurrent states) stay eager: `unsupported` says why.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import types
from dataclasses import dataclass

import torch

from attnzoo.engine.cache_tensors import CacheTensors
from attnzoo.layers.attention import Attention
from attnzoo.layers.batch import Batch
from attnzoo.layers.cache_spec import CacheKind, CacheSpec
from attnzoo.models.decoder import DecoderLM
from attnzoo.ops.attention.paged_decode import paged_decode

log = logging.getLogger("attnzoo.engine")

COMPILE_AFTER = 64   # eager decode steps a graph could have run before it is compiled (see `request`)


def ladder(max_num_seqs: int) -> list[int]:
    """Bucket sizes: powers of two below max_num_seqs, then max_num_seqs."""
    sizes = [1]
    while sizes[-1] * 2 < max_num_seqs:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == max_num_seqs else [*sizes, max_num_seqs]


def unsupported(model: DecoderLM, cache: CacheTensors) -> str | None:
    """Why the compiled decode step cannot serve this model, or None when it can."""
    if cache.states is not None:
        return "recurrent (delta-rule) states are kept eagerly"
    kinds = {g.spec.kind for g in cache.groups}
    if kinds - {CacheKind.KV}:
        return f"its layers keep {sorted(k.name for k in kinds - {CacheKind.KV})} rows beside plain K/V"
    if not all(type(layer.attn) is Attention for layer in model.layers):
        return "a layer runs its own attention"
    return None


class StaticDecode:
    """The layers' KVCache for a compiled decode step: every call is the paged decode op on the step's buffers."""

    def __init__(self, cache: CacheTensors, buf: "StepBuffers"):
        self.cache, self.buf = cache, buf

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, *,
               window_size: tuple[int, int], scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
        gi, j = self.cache.layer_group[(layer_idx, CacheKind.KV)]
        g, b = self.cache.groups[gi], self.buf
        return paged_decode(q, g.tensors["k"][j], g.tensors["v"][j], k, v, b.slots[g.table], b.tables[g.table],
                            b.lens[g.table], q.shape[-1] ** -0.5 if scale is None else scale, window_size[0], sinks)

    def store(self, layer_idx: int, spec: CacheSpec, *new: torch.Tensor) -> None:
        raise NotImplementedError("the compiled decode step serves plain K/V layers only (graph.unsupported)")


@dataclass
class StepBuffers:
    """One bucket's inputs, allocated once; T page tables, W pages per block table. As allocated, every row is
    padding: no slot, no keys."""
    ids: torch.Tensor      # [B] token ids
    pos: torch.Tensor      # [B] positions
    slots: torch.Tensor    # [T, B] the new K/V's slot per page table (-1: none)
    tables: torch.Tensor   # [T, B, W] int32 block tables
    lens: torch.Tensor     # [T, B] int32 key counts (the new token included)

    @classmethod
    def padding(cls, T: int, B: int, W: int, device: torch.device) -> "StepBuffers":
        z = dict(dtype=torch.int32, device=device)
        return cls(torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, dtype=torch.long, device=device),
                   torch.full((T, B), -1, dtype=torch.long, device=device), torch.zeros(T, B, W, **z),
                   torch.zeros(T, B, **z))

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.pos, self.slots, self.tables, self.lens


class DecodeGraph:
    def __init__(self, model: DecoderLM, cache: CacheTensors, max_num_seqs: int, max_model_len: int):
        self.model, self.cache = model, cache
        self.sizes = ladder(max_num_seqs)
        self.shape = (len(cache.windows), -(-max_model_len // cache.page_size))   # T tables, W pages each
        self.buffers = {B: StepBuffers.padding(self.shape[0], B, self.shape[1], cache.device) for B in self.sizes}
        if model.rotary is not None:   # the graph reads the RoPE tables as traced: cover the whole context first
            model.ropes(torch.tensor([max_model_len - 1], device=cache.device))
        # cpp_wrapper: the graph's calls (kernels, our ops) are made from C++, not from a Python wrapper. Dynamo
        # keeps compiled graphs per code object: this engine's step gets a code object of its own, so that another
        # engine in the process (another model) never meets its graphs (`run` skips the guards that would tell)
        forward = types.FunctionType(DecodeGraph.forward.__code__.replace(), globals(), "forward")
        self.fn = torch.compile(types.MethodType(forward, self), fullgraph=True, dynamic=False,
                                options={"cpp_wrapper": True, "compile_threads": 1})
        self.compiled: set[int] = set()   # buckets whose graph is ready
        self.failed: str | None = None    # why compiling failed: the engine stays eager
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self._queued: set[int] = set()
        self._asked: dict[int, int] = {}
        self._worker: threading.Thread | None = None

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                lens: torch.Tensor) -> torch.Tensor:
        """The static step (StepBuffers' tensors, in order) -> logits [B, V]."""
        B = ids.shape[0]
        step = StaticDecode(self.cache, StepBuffers(ids, pos, slots, tables, lens))
        batch = Batch(positions=pos, cu_seqlens=torch.arange(B + 1, dtype=torch.int32, device=ids.device), cache=step)
        return self.model.forward_batch(ids, batch)

    def bucket(self, B: int) -> int | None:
        """The bucket that runs B rows, or None (beyond the ladder)."""
        i = bisect.bisect_left(self.sizes, B)
        return self.sizes[i] if i < len(self.sizes) else None

    def compile(self, size: int) -> None:
        """Compile one bucket now (the engine calls it from its background thread; tests call it directly).
        It runs on buffers of padding of its own, so nothing is written and eager steps beside are untouched."""
        if size in self.compiled or self.failed:
            return
        serves = [size] if size == 1 else [s for s in self.sizes if s > 1]
        t0 = time.perf_counter()
        log.info("compiling the decode step for %s rows in the background; eager steps serve meanwhile",
                 serves if len(serves) > 1 else size)
        try:
            # built outside inference mode like the engine's own buffers (a guard tells the two kinds apart)
            pad = StepBuffers.padding(self.shape[0], size, self.shape[1], self.cache.device)
            if size > 1:   # one graph with a symbolic batch serves every bucket above 1 (one compile, not one each)
                for t, dim in zip(pad.args(), (0, 0, 1, 1, 1)):
                    torch._dynamo.mark_dynamic(t, dim)
            with torch.inference_mode():
                self.fn(*pad.args())
        except Exception as e:  # noqa: BLE001 - a model Inductor cannot compile keeps serving eagerly
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("the decode step did not compile (%s); serving eagerly", self.failed)
            return
        self.compiled.update(serves)
        log.info("compiled decode step for %s rows ready after %.1f s", serves if len(serves) > 1 else size,
                 time.perf_counter() - t0)

    def request(self, size: int) -> None:
        """Count an eager step that bucket `size` could have run; queue its graph for the background thread after
        COMPILE_AFTER of them. A short run (one `generate`) never starts a compile: the thread is not a daemon (a
        daemon thread stopped inside torch's C++ at interpreter exit aborts the process), so a process that ends
        while it compiles waits for it."""
        key = min(size, 2)   # bucket 1, or the one graph of every bucket above it
        self._asked[key] = self._asked.get(key, 0) + 1
        if key in self._queued or self.failed or self._asked[key] < COMPILE_AFTER:
            return
        self._queued.add(key)
        with self._lock:
            self._pending.append(size)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="attnzoo-compile")
                self._worker.start()

    def _work(self) -> None:
        """Compile what is queued, then end (a later request starts a new worker)."""
        while True:
            with self._lock:
                if not self._pending or self.failed:
                    self._worker = None
                    return
                size = self._pending.pop(0)
            self.compile(size)

    def try_run(self, ids: list[int], positions: list[int], page_tables: list[list[list[int]]]) -> torch.Tensor | None:
        """The step on its bucket's graph if that is compiled (logits [B, V]); else None, and the bucket is queued."""
        size = self.bucket(len(ids))
        if size is None or size not in self.compiled:
            if size is not None:
                self.request(size)
            return None
        return self.run(ids, positions, page_tables, size)

    def run(self, ids: list[int], positions: list[int], page_tables: list[list[list[int]]], size: int) -> torch.Tensor:
        """One decode step in bucket `size`: ids and positions [B], page_tables[b][t] of each row -> logits [B, V]."""
        B, ps, buf = len(ids), self.cache.page_size, self.buffers[size]
        buf.ids[:B] = torch.tensor(ids)
        pos = torch.tensor(positions)
        buf.pos[:B] = pos
        for t in range(self.shape[0]):
            lists = [r[t] for r in page_tables]
            w = max(map(len, lists))
            table = torch.tensor([x + [0] * (w - len(x)) for x in lists], dtype=torch.int32).clamp_(min=0)
            buf.tables[t, :B, :w] = table
            buf.slots[t, :B] = table.gather(1, (pos // ps)[:, None])[:, 0].long() * ps + pos % ps
        buf.lens[:, :B] = (pos + 1).to(torch.int32)
        buf.slots[:, B:] = -1   # rows a larger step used before are padding again
        buf.lens[:, B:] = 0
        return self.fn(*buf.args())[:B]
