"""DeepSeek-V3 (MLA + DeepSeek MoE) checkpoints -> attnzoo, against transformers' DeepseekV3ForCausalLM.

Tiny random models with every norm weight, bias and router correction bias randomised (they init to ones /
zeros, which would hide bugs), written by save_pretrained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import attnzoo
from attnzoo.engine import GenerationConfig, generate
from attnzoo.layers import LatentKV
from attnzoo.layers.mla import mla_softmax_scale
from tests.hf_oracle import random_hf

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5,
            attn_implementation="eager", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.8,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 64,
                            "beta_fast": 32, "beta_slow": 1}}
CASES: dict[str, dict[str, Any]] = {
    "q-lora": {},
    "no-q-lora": dict(q_lora_rank=None),
    "yarn-mscale": YARN,
    "all-dense": dict(first_k_dense_replace=2, rope_interleave=False),
    "moe-groups-bias": dict(first_k_dense_replace=0, n_routed_experts=8, n_group=2, topk_group=1,
                            num_experts_per_tok=3, n_shared_experts=2, norm_topk_prob=False, attention_bias=True),
}


def make_hf(overrides: dict[str, Any], seed: int = 0) -> DeepseekV3ForCausalLM:
    def redraw(name: str, p: torch.Tensor) -> None:
        if "norm" in name:
            p.uniform_(0.5, 1.5)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.1)
    return random_hf(DeepseekV3ForCausalLM, DeepseekV3Config(**{**BASE, **overrides}), redraw, seed)


def load(overrides: dict[str, Any], path: Path) -> tuple[DeepseekV3ForCausalLM, torch.nn.Module]:
    hf = make_hf(overrides)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, attnzoo.load_model(path)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf, ours = load(CASES[name], tmp_path)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
    scale = theirs.abs().max().item()
    assert scale > 0.5 and theirs.std().item() > 0.05, f"logits too small to mean anything (max |x| {scale})"
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * max(1.0, scale))


def test_case_configs_mean_what_they_say(tmp_path: Path) -> None:
    _, ours = load(CASES["moe-groups-bias"], tmp_path / "moe")
    assert all(type(layer.mlp).__name__ == "DeepseekMoE" for layer in ours.layers)
    assert ours.cache_specs() == [LatentKV(16 + 8)] * 2
    _, dense = load(CASES["all-dense"], tmp_path / "dense")
    assert all(type(layer.mlp).__name__ == "SwiGLU" for layer in dense.layers)
    hf, yarn = load(YARN, tmp_path / "yarn")
    assert yarn.layers[0].attn.scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    assert yarn.rotary.attention_factor != 1.0  # mscale != mscale_all_dim: cos/sin are scaled too


def test_deepseek_v3_softmax_scale() -> None:
    """docs/mechanisms/latent.md §2: 192^-0.5 * mscale(40, 1)^2 = 0.13523 (not 576^-0.5)."""
    s = mla_softmax_scale(192, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert s == pytest.approx(0.13523, abs=1e-5)
    assert mla_softmax_scale(192, None) == pytest.approx(192 ** -0.5)


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    """Prefill (expanded) then 15 single-token steps through the contiguous latent cache (absorbed)."""
    hf, ours = load({**YARN, "n_routed_experts": 8, "n_group": 2, "topk_group": 2}, tmp_path)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16,
                          min_new_tokens=16, eos_token_id=None, pad_token_id=0)
    theirs = out[0, prompt.shape[1]:].tolist()
    assert len(theirs) == 16
    assert generate(ours, prompt[0].tolist(), GenerationConfig(max_tokens=16)) == theirs

