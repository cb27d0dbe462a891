"""DeepSeek Sparse Attention checkpoints (deepseek_v32; glm_moe_dsa with IndexShare) -> attnzoo, against
transformers' own model code. Tiny random models with every norm weight, LayerNorm bias and router bias
randomised; prompts longer than index_topk, so the indexer's selection decides the output. Exact score ties at
the top-k boundary are implementation-defined (torch.topk breaks them differently for rows of different
lengths; we take the lower key index), and ReLU makes them common when every index head's dot product is
negative: 16 index heads make an all-zero key (probability 2^-16) practically impossible, so the comparison is
between selections, not tie-breaks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

from attnzoo.engine import GenerationConfig, generate
from tests.hf_oracle import assert_logits_match, hf_greedy, random_hf, save_and_load
from attnzoo.layers import IndexerKeys, LatentKV

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, index_topk=8, index_head_dim=16, index_n_heads=16,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            max_position_embeddings=256, initializer_range=0.1, attn_implementation="eager",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MODELS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "deepseek_v32": (DeepseekV32ForCausalLM, DeepseekV32Config, dict(BASE, num_hidden_layers=2)),
    "glm_moe_dsa-FSFS": (GlmMoeDsaForCausalLM, GlmMoeDsaConfig, dict(BASE, num_hidden_layers=4,
                                                                    index_topk_pattern="FSFS")),
    "glm_moe_dsa-freq": (GlmMoeDsaForCausalLM, GlmMoeDsaConfig, dict(BASE, num_hidden_layers=5, index_topk_freq=2,
                                                                    index_skip_topk_offset=2)),
}


def make_hf(name: str, seed: int = 0) -> torch.nn.Module:
    cls, cfg_cls, kw = MODELS[name]

    def redraw(pname: str, p: torch.Tensor) -> None:
        if "norm" in pname and pname.endswith(".weight"):
            p.uniform_(0.5, 1.5)
        elif pname.endswith(".bias"):
            p.normal_(0.0, 0.3)
    return random_hf(cls, cfg_cls(**kw), redraw, seed)


def load(name: str, path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf = make_hf(name)
    return save_and_load(hf, path)


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf, ours = load(name, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))   # 40 tokens, top-8
    assert_logits_match(hf, ours, ids)


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa-FSFS"])
def test_greedy_generation_matches_transformers(name: str, tmp_path: Path) -> None:
    hf, ours = load(name, tmp_path)
    prompt = torch.randint(3, VOCAB, (1, 21), generator=torch.Generator().manual_seed(2))
    want = hf_greedy(hf, [prompt[0].tolist()], 32)[0]
    assert generate(ours, prompt[0].tolist(), GenerationConfig(max_tokens=32)) == want


def test_selection_matters_and_index_share_schedule(tmp_path: Path) -> None:
    """The checks above would pass vacuously if the selection never excluded a key: with a top-k as long
    as the context the logits change. IndexShare: shared layers carry no indexer weights or key cache."""
    _, ours = load("glm_moe_dsa-freq", tmp_path)
    assert ours.config.dsa.indexer_types == ["full", "full", "shared", "full", "shared"]
    assert ours.cache_specs()[:3] == [(LatentKV(24), IndexerKeys(16)), (LatentKV(24), IndexerKeys(16)), LatentKV(24)]
    assert not hasattr(ours.layers[2].attn, "wq_b")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sparse = ours(ids)
        for layer in ours.layers:
            layer.attn.index_topk = 10_000
        dense = ours(ids)
    assert (sparse[:, :8] - dense[:, :8]).abs().max() < 1e-5      # fewer than 8 keys: nothing excluded
    assert (sparse[:, 20:] - dense[:, 20:]).abs().max() > 1e-3
