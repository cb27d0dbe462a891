"""The paged cache's tensors, one set per rank: the page tensors of each cache group and the recurrent-state
slots (with their prefix-cache snapshots). The page accounting (`PagedKVCache`, engine/paged_cache.py) runs on
rank 0 only and never touches a tensor: it records what must happen to them (`CacheOp`s: zero pages handed
out, zero a state slot taken, copy a state into a snapshot or back, stash a state before a speculative verify
step and put it back when its drafts are rejected) and each step carries those instructions to every rank, whose `ModelRunner` applies them to its own head shard before the forward (vLLM's and
SGLang's split: the scheduler owns the ids, the workers own the memory).

Every rank builds its `CacheTensors` from the same `CacheLayout` (rank 0's plan) and its own model's cache
specs, so page ids and slots mean the same on every rank while each holds only its heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnzoo.engine.cache_plan import group_specs, recurrent_specs
from attnzoo.layers.cache_spec import CacheKind, CacheSpec, RecurrentState


@dataclass
class CacheLayout:
    """Plain data (rank 0 broadcasts it): what every rank's tensors are shaped by."""
    page_size: int
    windows: list[int | None]               # per page table (None: full context)
    groups: list[tuple[list[int], int, int]]  # per cache group (`group_specs` order): layers, table, pages
    state_slots: int
    snapshot_slots: int
    stash: bool = False                     # speculative decoding on a recurrent model: a stash per state slot


# The instructions, in the order the accounting recorded them (see `CacheTensors.apply`).
@dataclass(frozen=True)
class ZeroPages:
    """Pages of a table just handed out: a masked slot still meets its value in `probs @ V` (0 * NaN = NaN),
    so no page a sequence can read may hold uninitialised memory or another sequence's NaN."""
    table: int
    pages: tuple[int, ...]


@dataclass(frozen=True)
class ZeroState:
    """A state slot just taken: a sequence starts from the zero state."""
    slot: int


@dataclass(frozen=True)
class SaveState:
    """A keep point: copy a sequence's states into a snapshot slot the prefix cache now owns."""
    slot: int
    snapshot: int


@dataclass(frozen=True)
class RestoreState:
    """A prefix-cache hit: copy the snapshot at the hit into the sequence's state slot."""
    snapshot: int
    slot: int


@dataclass(frozen=True)
class StashState:
    """A verify step is about to run drafts through a sequence's recurrent state: keep a copy of the state."""
    slot: int


@dataclass(frozen=True)
class UnstashState:
    """Drafts were rejected: the state goes back to the copy (the kept tokens are recomputed from it)."""
    slot: int


CacheOp = ZeroPages | ZeroState | SaveState | RestoreState | StashState | UnstashState


@dataclass
class GroupTensors:
    """The page tensors of one cache group, by name: KV has "k" [layers, Hkv, pages, page_size, d] and "v"
    (head-major: see ops/attention/paged.py); LATENT, INDEX_KEYS and ROWS have "rows" [layers, pages,
    page_size, D], one row per token shared by all heads; COMPRESSED has "rows" [layers, pages,
    ceil(page_size / stride), D] (see CompressedKV)."""
    spec: CacheSpec
    layer_ids: list[int]
    table: int
    tensors: dict[str, torch.Tensor]

    @property
    def pages_axis(self) -> int:
        return 2 if self.spec.kind is CacheKind.KV else 1

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def group_tensors(spec: CacheSpec, layers: int, pages: int, page_size: int, dtype: torch.dtype,
                  device: torch.device | str) -> dict[str, torch.Tensor]:
    """Uninitialised: the OS backs a page with memory only when it is first written, so a cache sized for
    the worst case costs what is used; a `ZeroPages` clears each page as it is handed out."""
    if spec.kind is CacheKind.KV:
        shape = (layers, spec.num_kv_heads, pages, page_size)
        return {"k": torch.empty(*shape, spec.head_dim, dtype=dtype, device=device),
                "v": torch.empty(*shape, spec.v_head_dim or spec.head_dim, dtype=dtype, device=device)}
    if spec.kind is CacheKind.COMPRESSED:  # one row per completed block: ceil(page_size / stride) per page
        return {"rows": torch.empty(layers, pages, spec.rows_per_page(page_size), spec.dim, dtype=dtype,
                                    device=device)}
    return {"rows": torch.empty(layers, pages, page_size, spec.dim, dtype=dtype, device=device)}


class StateTensors:
    """Per recurrent layer: [slots, conv_dim, K-1] conv inputs (model dtype) and [slots, H, dk, dv] float32
    state matrices. Uninitialised, like the pages: a slot is zeroed (or restored) when a sequence takes it."""

    def __init__(self, specs: dict[int, RecurrentState], num_slots: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.num_slots = num_slots
        self.conv = {i: torch.empty(num_slots, s.conv_dim, s.conv_width - 1, dtype=dtype, device=device)
                     for i, s in specs.items()}
        self.state = {i: torch.empty(num_slots, s.num_heads, s.k_dim, s.v_dim, dtype=torch.float32, device=device)
                      for i, s in specs.items()}

    def zero(self, slot: int) -> None:
        for t in (*self.conv.values(), *self.state.values()):
            t[slot].zero_()

    def copy(self, src: int, into: StateTensors, dst: int) -> None:
        """Every layer's states of slot src into slot dst of `into`."""
        for i in self.conv:
            into.conv[i][dst].copy_(self.conv[i][src])
            into.state[i][dst].copy_(self.state[i][src])


class CacheTensors:
    def __init__(self, specs: list[CacheSpec | tuple[CacheSpec, ...]], layout: CacheLayout, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        """specs: this rank's model's cache specs (its head shard); layout: rank 0's accounting's."""
        self.page_size, self.windows, self.device = layout.page_size, layout.windows, torch.device(device)
        grouped = group_specs(specs)
        if [layers for _, layers in grouped] != [layers for layers, _, _ in layout.groups]:
            raise ValueError("this model's cache groups differ from the layout's: the ranks disagree")
        self.groups: list[GroupTensors] = []
        self.layer_group: dict[tuple[int, CacheKind], tuple[int, int]] = {}
        for gi, ((spec, layers), (_, table, pages)) in enumerate(zip(grouped, layout.groups)):
            tensors = group_tensors(spec, len(layers), pages, self.page_size, dtype, device)
            self.groups.append(GroupTensors(spec, layers, table, tensors))
            for j, layer in enumerate(layers):
                self.layer_group[(layer, spec.kind)] = (gi, j)
        recurrent = recurrent_specs(specs)
        self.states = StateTensors(recurrent, layout.state_slots, dtype, device) if recurrent else None
        self.snapshots = StateTensors(recurrent, layout.snapshot_slots, dtype, device) \
            if recurrent and layout.snapshot_slots else None
        # uninitialised like the rest: only the slots that are stashed ever take memory
        self.stash = StateTensors(recurrent, layout.state_slots, dtype, device) \
            if recurrent and layout.stash else None

    def apply(self, ops: list[CacheOp]) -> None:
        """Carry out one step's instructions, before its forward. The state instructions run in the order
        recorded, which is the order the accounting reused the slots in: a snapshot saved when a request
        reached a keep point (after step N's forward, or as it finished or was preempted) is copied before a
        request that takes the freed slot zeroes it, and before a hit on that snapshot restores it, even when
        all of that lands in step N+1's list. Deferring a save to the next step's start is safe: nothing writes
        a state between the end of one forward and the next `apply`. Page zeroes touch only page tensors and
        commute with each other, so they run batched, one `index_fill_` per tensor whatever the batch."""
        pages: dict[int, list[int]] = {}
        for op in ops:
            if isinstance(op, ZeroPages):
                pages.setdefault(op.table, []).extend(op.pages)
            elif isinstance(op, ZeroState):
                self.states.zero(op.slot)
            elif isinstance(op, SaveState):
                self.states.copy(op.slot, self.snapshots, op.snapshot)
            elif isinstance(op, RestoreState):
                self.snapshots.copy(op.snapshot, self.states, op.slot)
            elif isinstance(op, StashState):
                self.states.copy(op.slot, self.stash, op.slot)
            elif isinstance(op, UnstashState):
                self.stash.copy(op.slot, self.states, op.slot)
            else:
                raise TypeError(f"not a cache instruction: {op!r}")
        for table, ps in pages.items():
            idx = torch.tensor(ps, dtype=torch.long, device=self.device)
            for g in self.groups:
                if g.table == table:
                    for t in g.tensors.values():
                        t.index_fill_(g.pages_axis, idx, 0)
