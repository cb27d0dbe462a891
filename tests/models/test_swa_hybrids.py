"""SWA/global hybrids (Cohere2, MiMo-V2-Flash) -> attnzoo, against transformers' own model code.

Tiny random checkpoints with norms, sink logits and router biases randomised; prompts longer than the window,
so the sliding layers really slide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Cohere2Config, Cohere2ForCausalLM, MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from attnzoo.engine import GenerationConfig, generate
from tests.hf_oracle import assert_logits_match, hf_greedy, random_hf, save_and_load
from attnzoo.layers import FullKV, SlidingKV

VOCAB = 128
MODELS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "cohere2": (Cohere2ForCausalLM, Cohere2Config, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=8, logit_scale=0.25,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, initializer_range=0.1,
        attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mimo_v2_flash": (MiMoV2FlashForCausalLM, MiMoV2FlashConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16, n_routed_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, sliding_window=8, initializer_range=0.1,
        attn_implementation="eager")),
}


def make_hf(name: str, seed: int = 0) -> torch.nn.Module:
    cls, cfg_cls, kw = MODELS[name]

    def redraw(pname: str, p: torch.Tensor) -> None:
        if "norm" in pname:
            p.uniform_(0.5, 1.5)
        elif pname.endswith(("sinks", "attention_sink_bias")):
            p.normal_(0.0, 1.0)
    return random_hf(cls, cfg_cls(**kw), redraw, seed)


def load(name: str, path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf = make_hf(name)
    return save_and_load(hf, path)


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf, ours = load(name, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))   # 30 tokens, window 8
    assert_logits_match(hf, ours, ids, min_scale=0.1, min_std=0.02)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_matches_transformers(name: str, tmp_path: Path) -> None:
    hf, ours = load(name, tmp_path)
    prompt = torch.randint(3, VOCAB, (1, 21), generator=torch.Generator().manual_seed(2))
    want = hf_greedy(hf, [prompt[0].tolist()], 32)[0]
    assert generate(ours, prompt[0].tolist(), GenerationConfig(max_tokens=32)) == want


def test_layer_layouts(tmp_path: Path) -> None:
    _, cohere = load("cohere2", tmp_path / "c")
    assert cohere.cache_specs() == [SlidingKV(2, 16, window=8)] * 3 + [FullKV(2, 16)]
    assert cohere.layer_rotary == {"full_attention": None}        # NoPE global layers
    assert cohere.layers[0].post_attention_layernorm is None       # parallel block
    _, mimo = load("mimo_v2_flash", tmp_path / "m")
    specs = mimo.cache_specs()
    assert specs[0] == FullKV(1, 24, 16) and specs[1] == SlidingKV(2, 24, 16, window=8)
    assert mimo.layers[1].attn.sinks is not None and mimo.layers[0].attn.sinks is None
    assert mimo.layer_rotary["full_attention"].rotary_dim == 8      # int(24 * 0.334)
