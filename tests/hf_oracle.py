"""Shared transformers-oracle helpers for the conformance tests: save a tiny random checkpoint and load
it with attnzoo, compare logits, and take transformers' greedy continuations (EOS never ends them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import attnzoo


def random_hf(cls: type, config: object, redraw: Callable[[str, torch.Tensor], None], seed: int = 0) -> torch.nn.Module:
    """A tiny transformers model in eval mode, seeded; `redraw(name, param)` redraws (in place) what
    transformers initialises to constants (norms at 1 or 0, zero biases, gate offsets), so a test cannot pass
    on them. MoE routers' score-correction buffers are drawn too."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            redraw(name, p)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


def save_and_load(hf: torch.nn.Module, path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf.save_pretrained(path, safe_serialization=True)
    return hf, attnzoo.load_model(path)


def assert_logits_match(hf: torch.nn.Module, ours: torch.nn.Module, ids: torch.Tensor, *, min_scale: float = 0.5,
                        min_std: float = 0.05) -> None:
    """Our logits equal transformers' within 1e-4 relative; logits too small to mean anything fail."""
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
    scale = theirs.abs().max().item()
    assert scale > min_scale and theirs.std().item() > min_std, f"logits too small to mean anything (max |x| {scale})"
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * max(1.0, scale))


def hf_greedy(hf: torch.nn.Module, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, exactly `new` tokens."""
    out = []
    for p in prompts:
        x = torch.tensor([p])
        with torch.no_grad():
            y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                            min_new_tokens=new, eos_token_id=None, pad_token_id=0)
        out.append(y[0, len(p):].tolist())
    return out


def random_prompts(vocab: int, lengths: tuple[int, ...], seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
