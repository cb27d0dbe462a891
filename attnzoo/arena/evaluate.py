"""Evaluate one trained contestant: validation loss / perplexity, MQAR accuracy per length, needle accuracy
per context, decode tokens/s at a long context through the engine, and what its cache and attention cost
(measured sizes from the layers' cache specs, FLOPs from the cost model: costs.py)."""

from __future__ import annotations

import math
import time

import torch

from attnzoo.arena.costs import attention_flops_per_token, kv_bytes_per_token
from attnzoo.arena.data import IGNORE, NeedleSet
from attnzoo.arena.noise import bootstrap
from attnzoo.models.decoder import DecoderLM


def _device(model: DecoderLM) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def mqar_accuracy(model: DecoderLM, sets: dict[int, tuple[torch.Tensor, torch.Tensor]], batch: int = 16
                  ) -> dict[int, float]:
    """Fraction of query positions whose argmax is the bound value, per sequence length."""
    out = {}
    dev = _device(model)
    for T, (x, y) in sets.items():
        right = total = 0
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch].to(dev), y[i:i + batch].to(dev)
            pred = model(xb).argmax(-1)
            m = yb != IGNORE
            right += int((pred[m] == yb[m]).sum())
            total += int(m.sum())
        out[T] = right / max(total, 1)
    return out


@torch.no_grad()
def needle_accuracy(model: DecoderLM, sets: list[NeedleSet], batch: int = 8) -> dict[int, float]:
    """Fraction of probes whose last-position argmax is the needle's value, per context length."""
    out = {}
    dev = _device(model)
    for s in sets:
        right = 0
        for i in range(0, len(s.inputs), batch):
            pred = model(s.inputs[i:i + batch].to(dev), last_only=True)[:, -1].argmax(-1).cpu()
            right += int((pred == s.answers[i:i + batch]).sum())
        out[s.context] = right / len(s.inputs)
    return out


def decode_speed(model: DecoderLM, prompt: list[int], new_tokens: int = 32) -> float:
    """Greedy decode tokens/s after a prompt of len(prompt) tokens, through the engine (paged cache, one
    sequence): generated tokens after the first / the time from the first token to the last."""
    from attnzoo.engine import LLM, SamplingParams
    llm = LLM(model, max_num_seqs=1, enable_prefix_caching=False, device=_device(model),
              kv_cache_memory=_cache_budget(model, len(prompt) + new_tokens))
    out = llm.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    return (len(out.token_ids) - 1) / max(m.finished_time - m.first_token_time, 1e-9)


def _cache_budget(model: DecoderLM, tokens: int) -> int:
    """Room for one sequence of `tokens` in every cache group (bf16/fp32 sizes alike), with margin."""
    elem = model.embed_tokens.weight.element_size()
    per_token = sum(s.bytes_per_token(elem) for spec in model.cache_specs()
                    for s in (spec if isinstance(spec, tuple) else (spec,)))
    state = sum(s.bytes_per_sequence(elem) for spec in model.cache_specs()
                for s in (spec if isinstance(spec, tuple) else (spec,)) if hasattr(s, "bytes_per_sequence"))
    return 2 * (per_token * (tokens + 64) + state) + (1 << 20)


@torch.no_grad()
def window_losses(model: DecoderLM, windows: torch.Tensor, batch: int = 8) -> list[float]:
    """Mean next-byte cross-entropy (nats) of each validation window [n, T + 1]: the bootstrap's units."""
    out: list[float] = []
    dev = _device(model)
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].to(dev)
        logits = model(w[:, :-1]).float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
        out += ce.mean(1).cpu().tolist()
    return out


def evaluate(name: str, model: DecoderLM, *, val: torch.Tensor, mqar_sets, needles: list[NeedleSet],
             decode_prompt: list[int] | None, decode_tokens: int, cost_contexts: tuple[int, ...]) -> dict:
    model.eval()
    per_window = window_losses(model, val)
    loss = sum(per_window) / len(per_window)   # equal windows: the same as the loss over all bytes
    iv = bootstrap(per_window)
    res: dict = {"val_loss": loss, "val_ppl": math.exp(loss), "val_interval": [iv.lo, iv.hi],
                 "val_windows": [round(v, 5) for v in per_window],
                 "mqar": {str(k): v for k, v in mqar_accuracy(model, mqar_sets).items()},
                 "needle": {str(k): v for k, v in needle_accuracy(model, needles).items()}}
    if decode_prompt is None:
        res["decode_tok_s"], res["decode_note"] = None, "skipped"
    else:
        t0 = time.perf_counter()
        try:
            res["decode_tok_s"], res["decode_note"] = decode_speed(model, decode_prompt, decode_tokens), ""
        except NotImplementedError as e:
            res["decode_tok_s"], res["decode_note"] = None, str(e)
        res["decode_seconds"] = time.perf_counter() - t0
    cfg = model.config
    res["kv_bytes_per_token"] = {str(c): kv_bytes_per_token(cfg, c) for c in cost_contexts}
    res["attn_flops_per_token"] = {str(c): attention_flops_per_token(cfg, c) for c in cost_contexts}
    return res
