"""Reference generation with a contiguous KV cache: one prefill, then one token per step.

Simple on purpose: it is the oracle the paged engine (`LLM`, which `attnzoo chat`, `generate` and
`serve` run on) must reproduce token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attnzoo.layers import ContiguousKVCache
from attnzoo.models.decoder import DecoderLM


@dataclass
class GenerationConfig:
    max_tokens: int = 256
    temperature: float = 0.0      # 0 = greedy (exact argmax)
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from logits [V]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream_generate(model: DecoderLM, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[int]:
    """Yield generated token ids one at a time; stops at a stop/eos id (not yielded) or max_tokens."""
    cfg.validate()
    ctx = model.config.max_position_embeddings
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= ctx:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {ctx} tokens")
    vocab = model.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    max_new = min(cfg.max_tokens, ctx - len(prompt_ids))
    stop = set(cfg.stop_token_ids)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    cache = ContiguousKVCache(batch_size=1, max_len=len(prompt_ids) + max_new)
    logits = model(torch.tensor([prompt_ids]), cache=cache, last_only=True)[0, -1]
    for i in range(max_new):
        tok = sample(logits, cfg.temperature, cfg.top_p, gen)
        if tok in stop:
            return
        yield tok
        if i + 1 < max_new:
            logits = model(torch.tensor([[tok]]), cache=cache, last_only=True)[0, -1]


def generate(model: DecoderLM, prompt_ids: list[int], cfg: GenerationConfig) -> list[int]:
    return list(stream_generate(model, prompt_ids, cfg))
