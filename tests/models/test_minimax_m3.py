"""MiniMax-M3 text model (MSA on GQA, clamped-GLU MoE) -> attnzoo, against transformers' MiniMaxM3VLForCausalLM.
Tiny random checkpoint with every zero-initialised (1 + w) norm and the router bias randomised; 40-token
prompts over blocks of 4 with a top-2 block budget, so the index branch's selection decides the output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MiniMaxM3VLForCausalLM, MiniMaxM3VLTextConfig

from attnzoo.engine import GenerationConfig, generate
from tests.hf_oracle import assert_logits_match, hf_greedy, random_hf, save_and_load
from attnzoo.layers import FullKV, IndexerKeys

VOCAB = 128
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, dense_intermediate_size=96,
              shared_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
              index_n_heads=2, index_head_dim=16, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
              layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
              mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=2.0, initializer_range=0.1,
              rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
              pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")


def make_hf(seed: int = 0) -> MiniMaxM3VLForCausalLM:
    def redraw(name: str, p: torch.Tensor) -> None:
        if "norm" in name:
            p.normal_(0.0, 0.3)     # (1 + w) form: w = 0 at init would hide a missing "+1"
    return random_hf(MiniMaxM3VLForCausalLM, MiniMaxM3VLTextConfig(**CONFIG), redraw, seed)


def load(path: Path) -> tuple[MiniMaxM3VLForCausalLM, torch.nn.Module]:
    hf = make_hf()
    return save_and_load(hf, path)


def test_logits_match_transformers(tmp_path: Path) -> None:
    hf, ours = load(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    assert_logits_match(hf, ours, ids)


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    hf, ours = load(tmp_path)
    prompt = torch.randint(3, VOCAB, (1, 21), generator=torch.Generator().manual_seed(2))
    want = hf_greedy(hf, [prompt[0].tolist()], 32)[0]
    assert generate(ours, prompt[0].tolist(), GenerationConfig(max_tokens=32)) == want


def test_config_and_selection_matters(tmp_path: Path) -> None:
    _, ours = load(tmp_path)
    assert ours.cache_specs() == [FullKV(2, 16), (FullKV(2, 16), IndexerKeys(16)), (FullKV(2, 16), IndexerKeys(16))]
    assert ours.rotary.rotary_dim == 8
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sparse = ours(ids)
        for layer in ours.layers[1:]:
            layer.attn.topk_blocks = 100
        dense = ours(ids)
    assert (sparse[:, :8] - dense[:, :8]).abs().max() < 1e-5   # two blocks hold the whole context
    assert (sparse[:, 20:] - dense[:, 20:]).abs().max() > 1e-3
