"""Per-request sampling parameters (vLLM semantics) and the batched sampler.

Order per step (as vLLM v1): logprobs from the raw logits; the grammar's mask (structured outputs); min_tokens masking; repetition penalty;
presence/frequency penalties; greedy rows take the argmax; the others go through temperature, top-k,
top-p and min-p, then draw with their own generator so a seeded request is independent of its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnzoo.engine.structured import StructuredOutputsParams

# Temperatures below this are treated as greedy: dividing by them would overflow to inf/nan.
_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy (exact argmax)
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1 = disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None       # top-n logprobs per generated token
    n: int = 1
    structured_outputs: StructuredOutputsParams | None = None   # a grammar the output must follow

    def __post_init__(self) -> None:
        # Normalise so the engine never has to handle the str/None spellings.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):   # the keyword form, e.g. {"json": schema}
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self, vocab_size: int | None = None, max_model_len: int | None = None,
                 prompt_len: int | None = None) -> None:
        """Raise ValueError naming the bad field and its allowed range. The comparisons are written as
        `not (ok)` so that NaN is rejected too."""
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(self.n >= 1, f"n must be >= 1, got {self.n}")
        check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        check(self.temperature >= 0 and not math.isinf(self.temperature),
              f"temperature must be >= 0 (and finite), got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k in (-1, 0) or self.top_k >= 1, f"top_k must be -1, 0 or >= 1, got {self.top_k}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(self.repetition_penalty > 0 and not math.isinf(self.repetition_penalty),
              f"repetition_penalty must be > 0 (and finite), got {self.repetition_penalty}")
        check(0 <= self.min_tokens <= self.max_tokens,
              f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
              f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        assert isinstance(self.stop, list) and isinstance(self.stop_token_ids, list)
        check(all(isinstance(s, str) and s for s in self.stop),
              f"stop strings must be non-empty strings, got {self.stop!r}")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            check(not bad, f"stop_token_ids must be in [0, {vocab_size}), got {bad}")
        if max_model_len is not None and prompt_len is not None:
            check(prompt_len + self.max_tokens <= max_model_len,
                  f"max_tokens ({self.max_tokens}) plus the prompt ({prompt_len} tokens) exceeds the model's "
                  f"context of {max_model_len} tokens")


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator the engine stores with a seeded request; None for unseeded ones."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None   # per-request (seeded) generator, or None for the sampler-wide one
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]   # top-n raw logprobs plus the sampled token; None if not requested
    sampled_logprobs: list[float | None]      # the sampled token's raw logprob; None if not requested


def _id_matrix(seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Right-padded [B, L] id tensor (L >= 1); `pad` is an extra column that is dropped afterwards."""
    width = max(1, max((len(s) for s in seqs), default=0))
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # for unseeded rows; None = torch's default generator

    def process_logits(self, logits: torch.Tensor, rows: list[SamplingRow],
                       eos_token_ids: list[int], allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The grammar mask (`allowed`, bool [B, V]), min_tokens masking and the penalties, as float32 [B, V];
        the input is not modified."""
        out = logits.float().clone()
        batch, vocab = out.shape
        dev = out.device
        if allowed is not None:
            out.masked_fill_(~allowed.to(dev), -math.inf)
        for i, r in enumerate(rows):
            if len(r.output_ids) < r.params.min_tokens:
                # ignore_eos only changes when the engine stops, not this masking.
                ids = [t for t in {*eos_token_ids, *(r.params.stop_token_ids or [])} if 0 <= t < vocab]
                out[i, ids] = -math.inf
        p = [r.params for r in rows]
        if any(x.repetition_penalty != 1.0 for x in p):
            seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=dev)
            seen.scatter_(1, _id_matrix([r.prompt_ids + r.output_ids for r in rows], vocab, dev), True)
            pen = torch.tensor([x.repetition_penalty for x in p], device=dev)[:, None]
            penalised = torch.where(out > 0, out / pen, out * pen)
            out = torch.where(seen[:, :vocab], penalised, out)
        if any(x.presence_penalty != 0.0 or x.frequency_penalty != 0.0 for x in p):
            ids = _id_matrix([r.output_ids for r in rows], vocab, dev)
            ones = torch.ones_like(ids, dtype=out.dtype)
            counts = torch.zeros(batch, vocab + 1, device=dev).scatter_add_(1, ids, ones)[:, :vocab]
            pres = torch.tensor([x.presence_penalty for x in p], device=dev)[:, None]
            freq = torch.tensor([x.frequency_penalty for x in p], device=dev)[:, None]
            out = out - pres * (counts > 0) - freq * counts
        return out

    @staticmethod
    def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p on float32 [B, V]; removed tokens become -inf."""
        dev, vocab = logits.device, logits.shape[-1]
        temp = torch.tensor([x.temperature for x in params], device=dev)[:, None]
        top_k = torch.tensor([x.top_k if x.top_k > 0 else vocab for x in params], device=dev)[:, None]
        top_p = torch.tensor([x.top_p for x in params], device=dev)[:, None]
        min_p = torch.tensor([x.min_p for x in params], device=dev)[:, None]
        # Stable sort so ties rank the lower id first, as argmax does (top_k=1 == greedy).
        srt, order = (logits / temp).sort(dim=-1, descending=True, stable=True)
        srt = srt.masked_fill(torch.arange(vocab, device=dev)[None] >= top_k, -math.inf)
        probs = srt.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays); top_p=1 skips
        # this so rounding in the cumsum cannot drop tail tokens.
        drop_p = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1.0)
        srt = srt.masked_fill(drop_p, -math.inf)
        # p_i / p_max = exp(l_i - l_max), unchanged by the renormalisation after top-k/top-p.
        srt = srt.masked_fill((srt - srt[:, :1]).exp() < min_p, -math.inf)
        return torch.empty_like(srt).scatter_(-1, order, srt)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: list[int],
                 allowed: torch.Tensor | None = None) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        want_lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_lp = logits[want_lp].float().log_softmax(-1) if want_lp else None  # before any processing
        x = self.process_logits(logits, rows, eos_token_ids, allowed)
        tokens = x.argmax(-1).tolist()  # final for greedy rows
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if rand:
            # Inverse-CDF sampling: one uniform per row from the row's own generator keeps seeded requests
            # batch-independent, at the cost of a cumsum rather than multinomial's per-row passes.
            cdf = self._probs(x, rows, rand).cumsum(-1)
            u = torch.cat([self._uniform(rows[i]) for i in rand])
            u = (u.to(cdf.device) * cdf[:, -1]).clamp(min=torch.finfo(cdf.dtype).tiny)[:, None]
            picked = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)[:, 0].tolist()
            for j, i in enumerate(rand):
                tokens[i] = picked[j]
        return self._result(raw_lp, want_lp, rows, tokens)

    def _probs(self, x: torch.Tensor, rows: list[SamplingRow], rand: list[int]) -> torch.Tensor:
        """The sampling distribution [len(rand), V] of the non-greedy rows of the processed logits x."""
        params = [rows[i].params for i in rand]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            z = self.filter_logits(x[rand], params)  # sorts the vocabulary: only when a filter is on
        else:
            z = x[rand] / torch.tensor([p.temperature for p in params], device=x.device)[:, None]
        return z.softmax(-1)

    def _uniform(self, row: SamplingRow) -> torch.Tensor:
        g = row.generator or self.generator
        return torch.rand(1, generator=g, device=g.device if g is not None else "cpu")

    def _draw(self, probs: torch.Tensor, row: SamplingRow) -> int:
        """One token from probs [V] (unnormalised is fine) by inverse CDF with the row's generator."""
        cdf = probs.cumsum(-1)
        u = (self._uniform(row).to(cdf.device) * cdf[-1]).clamp(min=torch.finfo(cdf.dtype).tiny)
        return int(torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1))

    @torch.inference_mode()
    def verify(self, logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: list[int],
               drafts: list[list[int]], allowed: torch.Tensor | None = None
               ) -> tuple[list[list[int]], SampleResult]:
        """Speculative verification. Request i owns len(drafts[i]) + 1 consecutive rows: row j is the target's
        distribution after the request's tokens and drafts[i][:j] (its SamplingRow's output_ids include them,
        so penalties and min_tokens see the drafts). A greedy request keeps drafts while they equal the argmax;
        a sampled one keeps draft d with probability p(d) and on rejection draws from p without d,
        renormalised: the standard rule for a point-mass draft, so each emitted token is distributed exactly as
        the target's. Either way one token of the target's own follows the kept drafts. Returns the tokens
        each request emits (kept drafts plus that token) and, per row, the flat SampleResult of the rows
        that emitted (logprobs as __call__ gives them)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows) or sum(len(d) + 1 for d in drafts) != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} must have one row per draft plus one per request "
                             f"({sum(len(d) + 1 for d in drafts)}) and match the {len(rows)} sampling rows")
        want_lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_lp = logits[want_lp].float().log_softmax(-1) if want_lp else None
        x = self.process_logits(logits, rows, eos_token_ids, allowed)
        argmax = x.argmax(-1).tolist()
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        probs = self._probs(x, rows, rand) if rand else None
        where = {i: j for j, i in enumerate(rand)}
        emitted: list[list[int]] = []
        tokens = list(argmax)           # per row: the token it emitted (rows that emitted nothing keep argmax)
        used: list[int] = []            # the rows that emitted, in order
        i = 0
        for d in drafts:
            out = []
            for j in range(len(d) + 1):
                row = rows[i + j]
                if row.params.greedy:
                    tok = argmax[i + j]
                    ok = j < len(d) and tok == d[j]
                else:
                    p = probs[where[i + j]]
                    if j < len(d) and float(self._uniform(row)) < float(p[d[j]]):
                        tok, ok = d[j], True
                    elif j < len(d):
                        tok, ok = self._draw(p.clone().index_fill_(0, torch.tensor([d[j]]), 0.0), row), False
                    else:
                        tok, ok = self._draw(p, row), False
                tokens[i + j] = tok
                out.append(tok)
                used.append(i + j)
                if not ok:
                    break
            emitted.append(out)
            i += len(d) + 1
        full = self._result(raw_lp, want_lp, rows, tokens)
        keep = lambda xs: [xs[r] for r in used]  # noqa: E731
        return emitted, SampleResult(keep(full.token_ids), keep(full.logprobs), keep(full.sampled_logprobs))

    @staticmethod
    def _result(raw_lp: torch.Tensor | None, want_lp: list[int], rows: list[SamplingRow],
                tokens: list[int]) -> SampleResult:
        """Per row: the token, and its raw logprob plus the top-n where the row asked for logprobs."""
        logprobs: list[dict[int, float] | None] = [None] * len(rows)
        sampled: list[float | None] = [None] * len(rows)
        if raw_lp is not None:
            for j, i in enumerate(want_lp):
                n = rows[i].params.logprobs or 0
                vals, ids = raw_lp[j].topk(n)
                d = dict(zip(ids.tolist(), vals.tolist()))
                d[tokens[i]] = sampled[i] = float(raw_lp[j, tokens[i]])
                logprobs[i] = d
        return SampleResult(token_ids=tokens, logprobs=logprobs, sampled_logprobs=sampled)
