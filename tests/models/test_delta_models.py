"""Delta-rule hybrids (Qwen3-Next, Qwen3.5, Kimi Linear) -> attnzoo, against transformers' own model code.

Tiny random checkpoints written by save_pretrained, with every zero- or one-initialised norm weight, decay
parameter and router bias randomised: Qwen's RMSNorms are applied as (1 + w) with w = 0 at init, which would
hide a missing "+1". transformers runs its pure-PyTorch delta-rule fallbacks here (fla-core must not be
importable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (KimiLinearConfig, KimiLinearForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig,
                          Qwen3NextConfig, Qwen3NextForCausalLM)

from attnzoo.engine import GenerationConfig, generate
from tests.hf_oracle import assert_logits_match, hf_greedy, random_hf, save_and_load
from attnzoo.layers import RecurrentState
from attnzoo.layers.cache_spec import FullKV, LatentKV

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, initializer_range=0.1,
              attn_implementation="eager")
QWEN = dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
            max_position_embeddings=512, rms_norm_eps=1e-6)
MODELS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "qwen3_next": (Qwen3NextForCausalLM, Qwen3NextConfig, dict(
        QWEN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    "qwen3_next-mlp-only-gqa3": (Qwen3NextForCausalLM, Qwen3NextConfig, dict(
        QWEN, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=0,
        mlp_only_layers=[0, 1, 2, 3], linear_num_value_heads=6, num_hidden_layers=5, full_attention_interval=2)),
    "qwen3_5": (Qwen3_5ForCausalLM, Qwen3_5TextConfig, dict(
        QWEN, rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                               "mrope_section": [1, 1, 0], "mrope_interleaved": True})),
    "kimi_linear": (KimiLinearForCausalLM, KimiLinearConfig, dict(
        COMMON, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        linear_attn_config={"head_dim": 16, "num_heads": 4, "short_conv_kernel_size": 4,
                            "full_attn_layers": [2, 4], "kda_layers": [1, 3]},
        num_experts=4, num_experts_per_token=2, num_shared_experts=1, num_expert_group=2, topk_group=1,
        model_max_length=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)),
}


def make_hf(name: str, seed: int = 0) -> torch.nn.Module:
    cls, cfg_cls, kw = MODELS[name]
    zero_centred = name.startswith("qwen")

    def redraw(pname: str, p: torch.Tensor) -> None:
        if pname.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight")) or pname == "model.norm.weight":
            p.copy_(torch.randn_like(p) * 0.3 if zero_centred else torch.rand_like(p) + 0.5)
        elif pname.endswith(("linear_attn.norm.weight", "o_norm.weight")):
            p.uniform_(0.5, 1.5)
        elif pname.endswith("A_log"):
            p.copy_(torch.empty_like(p).uniform_(1, 16).log())
        elif pname.endswith("dt_bias"):
            p.normal_(0.0, 0.5)
    return random_hf(cls, cfg_cls(**kw), redraw, seed)


def load(name: str, path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf = make_hf(name)
    return save_and_load(hf, path)


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf, ours = load(name, tmp_path)
    # 150 tokens: several 64-token chunks, so the state passes between chunks
    ids = torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(1))
    assert_logits_match(hf, ours, ids)


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5", "kimi_linear"])
def test_greedy_generation_matches_transformers(name: str, tmp_path: Path) -> None:
    """32 greedy tokens: prefill through the chunked op, decode through the recurrent step with the conv
    and delta states carried in the cache (several requests at once: tests/engine/test_delta_engine.py)."""
    hf, ours = load(name, tmp_path)
    prompt = torch.randint(3, VOCAB, (1, 21), generator=torch.Generator().manual_seed(2))
    want = hf_greedy(hf, [prompt[0].tolist()], 32)[0]
    assert generate(ours, prompt[0].tolist(), GenerationConfig(max_tokens=32)) == want


def test_configs_mean_what_they_say(tmp_path: Path) -> None:
    _, nxt = load("qwen3_next", tmp_path / "next")
    specs = nxt.cache_specs()
    assert [type(s) for s in specs] == [RecurrentState] * 3 + [FullKV]
    assert specs[0] == RecurrentState(conv_dim=2 * 2 * 16 + 4 * 8, conv_width=4, num_heads=4, k_dim=16, v_dim=8)
    assert [type(layer.mlp).__name__ for layer in nxt.layers] == ["QwenMoE"] * 4
    assert nxt.layers[3].attn.output_gate and nxt.rotary.rotary_dim == 4  # 0.25 of head_dim 16
    _, dense = load("qwen3_next-mlp-only-gqa3", tmp_path / "dense")
    assert [layer.attn.__class__.__name__ for layer in dense.layers] == ["GatedDeltaNet", "Attention"] * 2 + ["GatedDeltaNet"]
    assert [type(layer.mlp).__name__ for layer in dense.layers] == ["SwiGLU"] * 4 + ["QwenMoE"]
    assert dense.layers[4].mlp.shared_expert is None
    _, kimi = load("kimi_linear", tmp_path / "kimi")
    assert kimi.rotary is None  # NoPE MLA
    assert [type(s) for s in kimi.cache_specs()] == [RecurrentState, LatentKV, RecurrentState, LatentKV]
    assert [type(layer.mlp).__name__ for layer in kimi.layers] == ["SwiGLU"] + ["DeepseekMoE"] * 3


def test_training_path_gradients_flow(tmp_path: Path) -> None:
    """No cache (training): the whole hybrid is differentiable, through the chunked op and the conv."""
    _, ours = load("qwen3_5", tmp_path)
    ours.train()
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(3))
    logits = ours(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    gdn = ours.layers[0].attn
    for p in (gdn.in_proj.weight, gdn.conv_weight, gdn.A_log, gdn.dt_bias, gdn.norm_weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
