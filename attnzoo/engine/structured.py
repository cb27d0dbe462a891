"""Structured outputs: grammar-constrained decoding with llguidance.

A request with `SamplingParams.structured_outputs` gets a matcher (one per completion) over its grammar: a JSON
schema, a regex, a list of choices or a Lark/GBNF grammar. Every step each constrained row's next-token bitmask
is filled (in parallel, llguidance's executor drops the GIL) and the sampler sets the disallowed logits to -inf
before anything else; the matcher then consumes the tokens the request emits. EOS is allowed only where the
grammar may end. Speculative drafts: each verify row gets the mask after the drafts before it (the matcher
consumes the drafts, then rolls back), so a draft the grammar forbids is rejected like any other.

Grammars are compiled once per source and cached; compilation runs on a worker thread, so a request waits for
its grammar outside the scheduler and a slow schema never stalls the others. llguidance rather than xgrammar:
no runtime dependencies (xgrammar's wheel requires transformers, a test oracle here) and, on the default model
(bench/structured.py), several times faster to compile a schema; xgrammar's per-token masks are faster, but
here masks are under 1% of a step.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from attnzoo.engine.request import Request
    from attnzoo.models.tokenizer import Tokenizer

log = logging.getLogger("attnzoo.engine")

KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_GRAMMAR_BYTES = 64 * 1024     # a schema or grammar's source text; bigger is rejected before compiling
MAX_CHOICES = 1024
CACHE_SIZE = 256                  # compiled grammars kept (oldest dropped first)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint (vLLM's names). `after`: the constraint starts once the output contains this text
    (a reasoning model's end-of-thinking tag), before it the output is free."""
    json: dict | str | None = None            # a JSON schema (a dict or its JSON text)
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None                # Lark (llguidance's dialect) or GBNF (llama.cpp's)
    json_object: bool = False                 # any JSON object
    after: str | None = None

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema object or its JSON text, got "
                             f"{type(self.json).__name__}")
        for k in ("regex", "grammar", "after"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{k} must be a non-empty string")
        if self.choice is not None:
            c = self.choice
            if not isinstance(c, (list, tuple)) or not c or not all(isinstance(s, str) and s for s in c):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            if len(c) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice has {len(c)} entries; at most {MAX_CHOICES}")
            object.__setattr__(self, "choice", tuple(c))   # frozen all the way down
        if len(self.source().encode()) > MAX_GRAMMAR_BYTES:
            raise ValueError(f"structured_outputs.{self.kind} is {len(self.source().encode())} bytes; at most "
                             f"{MAX_GRAMMAR_BYTES}")

    def _given(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) is not None and getattr(self, k) is not False]

    @property
    def kind(self) -> str:
        return self._given()[0]

    def source(self) -> str:
        """The constraint as text: what the cache is keyed on (with the kind)."""
        v = getattr(self, self.kind)
        if self.kind == "json":
            return v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        if self.kind == "choice":
            return json.dumps(list(v))
        return "" if v is True else v


def to_llguidance(so: StructuredOutputsParams) -> str:
    """The llguidance grammar text for a constraint (not yet validated)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark
    # compact JSON: with flexible whitespace a small model can pad forever inside an object
    opts = {"whitespace_flexible": False}
    if so.kind == "json":
        schema = json.loads(so.json) if isinstance(so.json, str) else so.json
        return LLMatcher.grammar_from_json_schema(schema, defaults=opts)
    if so.kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=opts)
    if so.kind == "regex":
        return LLMatcher.grammar_from_regex(so.regex)
    if so.kind == "choice":   # JSON string literals are valid Lark string literals
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
    return LLMatcher.grammar_from_lark(any_to_lark(so.grammar))


@dataclass
class StructuredStats:
    compiles: int = 0
    compile_seconds: float = 0.0
    mask_rows: int = 0            # constrained rows masked, summed over steps
    mask_seconds: float = 0.0     # filling and applying those masks


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer; builds matchers; fills bitmasks."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stats = StructuredStats()
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], str] = {}
        self._lltok = None
        self._executor = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="attnzoo-grammar")

    @property
    def lltok(self) -> Any:
        with self._lock:    # built once (~0.5 s), by whichever thread needs it first
            if self._lltok is None:
                from llguidance import LLTokenizer
                self._lltok = LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                          eos_token=list(self.tokenizer.eos_token_ids))
            return self._lltok

    def compile(self, so: StructuredOutputsParams) -> str:
        """The validated grammar text, cached; ValueError with llguidance's message when it does not compile."""
        key = (so.kind, so.source())
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        from llguidance import LLMatcher
        t = time.perf_counter()
        try:
            grammar = to_llguidance(so)
        except Exception as e:   # noqa: BLE001 - the converters raise bare Exceptions for bad input
            raise ValueError(f"structured_outputs.{so.kind} does not compile: {e}") from None
        # llguidance's default parser limits (lexer fuel, grammar size) bound what a compile can cost
        is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise ValueError(f"structured_outputs.{so.kind} does not compile: {msgs[0]}")
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += time.perf_counter() - t
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = grammar
        return grammar

    def cache_clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def matcher(self, grammar: str) -> Any:
        from llguidance import LLMatcher
        m = LLMatcher(self.lltok, grammar)
        if m.is_error():
            raise ValueError(f"grammar does not compile: {m.get_error()}")
        return m

    def submit(self, so: StructuredOutputsParams, n: int) -> Future:
        """Compile (or fetch) off the caller's thread; the future gives n fresh matchers."""
        return self._pool.submit(lambda: [self.matcher(g) for g in [self.compile(so)] * n])

    # ---- per step -------------------------------------------------------------------------------
    def allowed(self, rows: list["GrammarState | None"], drafts: list[list[int]] | None = None
                ) -> torch.Tensor | None:
        """Bool [R, vocab] of allowed tokens for the sampling rows, or None when no row is constrained. Without
        drafts: one row per entry of `rows`. With drafts: entry i owns len(drafts[i]) + 1 rows (Sampler.verify)."""
        drafts = drafts or [[] for _ in rows]
        if not any(g is not None and g.active for g in rows):
            return None
        t = time.perf_counter()
        total = sum(len(d) + 1 for d in drafts)
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((total, words), -1, dtype=torch.int32)   # all ones: unconstrained rows allow all
        work, r = [], 0
        for g, d in zip(rows, drafts):
            if g is not None and g.active:
                m, used = g.matcher, 0
                if not d:
                    work.append((m, r))
                for j in range(len(d) + 1 if d else 0):
                    # fill now: the matcher's state moves with the drafts
                    self._fill([(m, r + j)], bitmask)
                    if j == len(d) or m.try_consume_tokens([d[j]]) != 1:
                        break   # a draft the grammar forbids is rejected at its own row; later rows are unused
                    used += 1
                if used:
                    m.rollback(used)
            r += len(d) + 1
        if work:
            self._fill(work, bitmask)
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :self.vocab_size]
        self.stats.mask_rows += sum(1 for g in rows if g is not None and g.active)
        self.stats.mask_seconds += time.perf_counter() - t
        return allowed

    def _fill(self, rows: list[tuple[Any, int]], bitmask: torch.Tensor) -> None:
        """Each (matcher, row): that row's mask, computed in parallel by llguidance's executor without the GIL.
        (Not llguidance.torch's helper: importing it pulls in torch.compile, seconds of start-up.)"""
        if self._executor is None:
            from llguidance import LLExecutor
            self._executor = LLExecutor()
        self._executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


@dataclass
class GrammarState:
    """A completion's matcher. Inactive until `after` shows up in the output (reasoning first), and for good once
    the matcher rejects a token (after = None then)."""
    matcher: Any
    after: str | None = None
    active: bool = True
    tail: list[int] = field(default_factory=list)   # recent tokens, while waiting for `after`

    def __post_init__(self) -> None:
        self.active = self.after is None

    def accept(self, token: int, tokenizer: "Tokenizer | None") -> None:
        """The request emitted `token`: advance the matcher, or look for `after` while inactive."""
        if self.active:
            if not self.matcher.consume_token(token):
                # only reachable when something outside the mask was emitted (ignore_eos after the grammar ended)
                log.warning("structured output: token %d rejected by the grammar (%s); constraint dropped", token,
                            self.matcher.get_error())
                self.active, self.after = False, None
        elif self.after is not None:
            self.tail = (self.tail + [token])[-16:]
            if tokenizer is not None and self.after in tokenizer.decode(self.tail, skip_special_tokens=False):
                self.active = True   # the grammar constrains from the next token on


def grammar_pending(req: "Request") -> bool:
    """A request still waiting for its reasoning to end: not drafted for (its drafts would go unconstrained)."""
    return req.grammar is not None and not req.grammar.active and req.grammar.after is not None


class GrammarWait:
    """Requests whose grammar is compiling: they join the scheduler when their matchers are ready."""

    def __init__(self) -> None:
        self.items: list[tuple[Future, list["Request"], StructuredOutputsParams]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, fut: Future, reqs: list["Request"], so: StructuredOutputsParams) -> None:
        self.items.append((fut, reqs, so))

    def ready(self, block: bool) -> tuple[list["Request"], list[tuple["Request", str]]]:
        """(requests now ready, with their GrammarState set; requests whose grammar failed, with why). `block`:
        wait for the first compile to finish (the scheduler has nothing else to do)."""
        if block and self.items:
            wait([f for f, _, _ in self.items], return_when=FIRST_COMPLETED)
        ready, failed, keep = [], [], []
        for fut, reqs, so in self.items:
            if not fut.done():
                keep.append((fut, reqs, so))
                continue
            try:
                for r, m in zip(reqs, fut.result()):
                    r.grammar = GrammarState(m, so.after)
                    ready.append(r)
            except Exception as e:   # noqa: BLE001 - any compile failure ends these requests, never the engine
                failed.extend((r, str(e)) for r in reqs)
        self.items = keep
        return ready, failed

    def admit(self, scheduler: Any, finish: Any) -> None:
        """Ready requests join the scheduler; failed ones end (`finish(req, "abort")`), never the engine. With
        nothing else to run, wait for the first compile."""
        ready, failed = self.ready(block=not scheduler.has_work())
        for r in ready:
            scheduler.add(r)
        for r, why in failed:
            log.warning("request %s: %s", r.request_id, why)
            finish(r, "abort")

    def drop(self, req: "Request") -> bool:
        """Forget an aborted request; True when it was waiting here."""
        for _, reqs, _ in self.items:
            if req in reqs:
                reqs.remove(req)
                return True
        return False
