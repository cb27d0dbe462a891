"""A request's life in the engine: its tokens, how many have KV computed, its pages and its output."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from attnzoo.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0               # tokens whose KV is in the cache
    page_tables: list[list[int]] = field(default_factory=list)   # per page table; -1 = released page
    prefix_handle: Any = None           # locked radix node covering the shared prefix
    tree_tokens: int = 0                # tokens of this request that the radix tree holds
    state_slot: int | None = None       # its slot in the recurrent-state pool (delta-rule layers)
    keep_at: set[int] = field(default_factory=set)  # hybrids: token counts whose window pages / states the tree keeps
    cached_tokens: int = 0              # prompt tokens served from the prefix cache (first admission)
    spec_ids: list[int] = field(default_factory=list)   # this step's draft tokens (engine/speculative.py)
    num_draft_tokens: int = 0           # drafts verified so far
    num_accepted_tokens: int = 0        # of which the target kept
    drafter: Any = None                 # the drafter's per-request state (an n-gram index, the adaptive k)
    grammar: Any = None                 # its GrammarState (engine/structured.py) when structured_outputs is set
    num_preemptions: int = 0
    finish_reason: str | None = None    # stop | length | abort
    stop_reason: int | None = None      # the stop token id that ended it (stop strings: engine/outputs.py)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        """Token i of prompt + output + this step's drafts."""
        p = len(self.prompt_ids)
        if i < p:
            return self.prompt_ids[i]
        i -= p
        return self.output_ids[i] if i < len(self.output_ids) else self.spec_ids[i - len(self.output_ids)]

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
