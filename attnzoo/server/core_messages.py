"""What crosses the pipe between the API process and the engine-core process (pickled by
multiprocessing.connection). The API sends lists of commands; the core answers with one `StepOutput` per
engine step (every request's new token ids at once), a `Reply` per query, and `CoreDead` when it fails.
Text never crosses: the API process tokenises, detokenises and applies stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attnzoo.engine.outputs import RequestMetrics
from attnzoo.engine.sampling import SamplingParams
from attnzoo.models.tokenizer import Tokenizer


@dataclass
class EngineConfig:
    """How the core builds its `LLM`: the model (a name or a path: the core loads it) and LLM keywords."""
    model: str
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None       # torch threads in the core; default: every core this process may run on
    log_level: str = "WARNING"


@dataclass
class EngineInfo:
    """Sent once by the core when its model is loaded: what the API process needs to validate requests."""
    tokenizer: Tokenizer
    max_model_len: int
    kv_tokens: int
    vocab_size: int
    threads: int
    worker_pids: list[int]           # tensor-parallel workers (ranks 1..N-1), started by the core
    speculative: bool = False        # a speculative_config is on: the spec_decode metrics exist


# ---- API -> core ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class Abort:
    request_id: str
    index: int | None = None         # one completion of an n > 1 request (it met a stop string), or all


@dataclass(slots=True)
class Query:
    qid: int
    what: str                        # a key of EngineCore.QUERIES


@dataclass(slots=True)
class Shutdown:
    pass


# ---- core -> API ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class SeqDelta:
    """One completion's tokens sampled this step (usually one) and, when it ended, why."""
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass(slots=True)
class GroupDelta:
    request_id: str
    seqs: list[SeqDelta]
    finished: bool
    cached_tokens: int
    metrics: RequestMetrics
    num_preemptions: int
    num_draft_tokens: int = 0        # speculative decoding, over the group's completions so far
    num_accepted_tokens: int = 0


@dataclass(slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    num_preemptions: int             # since start
    spec_drafted: int = 0            # draft tokens verified since start
    spec_accepted: int = 0           # of which kept
    spec_lengths: list[int] = field(default_factory=list)   # acceptance lengths (kept + 1) of this step's verifies


@dataclass(slots=True)
class StepOutput:
    outputs: list[GroupDelta]
    stats: EngineStats
    accepted: list[str]              # adds taken since the previous step
    rejected: list[tuple[str, str, str]]   # (request_id, exception type, message): ValueError is the client's


@dataclass(slots=True)
class Reply:
    qid: int
    value: Any


@dataclass(slots=True)
class CoreDead:
    reason: str
    bad_input: bool = False          # it failed to start on a ValueError (e.g. no such model): the user's to fix
