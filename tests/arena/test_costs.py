"""The arena's cost columns against hand-computed FLOPs and bytes (GQA, MLA, and the two kinds the shared
cost model does not cover: sliding windows and the delta rule)."""

from __future__ import annotations

import pytest

from attnzoo.arena.costs import attention_flops_per_token, kv_bytes_per_token, kv_read_bytes_per_token
from attnzoo.models.config import ModelConfig

BASE = dict(architecture="attnzoo", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=4096)


@pytest.mark.parametrize("p", [1, 100, 32768, 1 << 20])
def test_gqa_by_hand(p):
    cfg = ModelConfig(**BASE)
    # per layer: scores + values 2*H*p*(dk+dv); q, k, v projections 2*D*(H*dk + Hkv*(dk+dv)); o 2*H*dv*D
    attn = 2 * 4 * p * (8 + 8)
    proj = 2 * 32 * (4 * 8 + 2 * 16) + 2 * 4 * 8 * 32
    assert attention_flops_per_token(cfg, p) == 2 * (attn + proj)
    assert kv_read_bytes_per_token(cfg, p) == 2 * p * 2 * 16 * 2          # layers * p * Hkv * (dk+dv) * bf16
    assert kv_bytes_per_token(cfg, p) == 2 * 2 * 16 * 2                    # 128 bytes stored per token


@pytest.mark.parametrize("p", [1, 4096, 1 << 20])
def test_mla_by_hand(p):
    mla = dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    cfg = ModelConfig(**{**BASE, "num_kv_heads": 4, "head_dim": 4}, attention_type="mla", mla=mla)
    H, D, r, dr, dn, dv, qr = 4, 32, 16, 4, 8, 8, 24
    attn = 2 * H * p * (2 * r + dr)              # absorbed: MQA over the latent, scores over r + dr, values over r
    absorb = 2 * H * (dn * r + r * dv)           # q_nope -> latent space, latent output -> v
    proj = 2 * D * qr + 2 * qr * H * (dn + dr) + 2 * D * (r + dr) + 2 * H * dv * D
    assert attention_flops_per_token(cfg, p) == 2 * (attn + absorb + proj)
    assert kv_read_bytes_per_token(cfg, p) == 2 * p * (r + dr) * 2
    assert kv_bytes_per_token(cfg, p) == 2 * (r + dr) * 2                  # one 20-wide latent per token and layer


def test_sliding_window_and_delta_rule_by_hand():
    swa = ModelConfig(**BASE, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    gqa = ModelConfig(**BASE)
    for p in (10, 64, 5000):
        assert attention_flops_per_token(swa, p) == attention_flops_per_token(gqa, min(p, 64)) / 2 \
            + attention_flops_per_token(gqa, p) / 2
    assert kv_bytes_per_token(swa, 4096) == 64 * 64 / 4096 + 64      # 64 B/token: the window's, amortised + full
    lin = dict(kind="gdn", num_k_heads=2, num_v_heads=4, k_dim=8, v_dim=8, conv_width=4)
    gdn = ModelConfig(**BASE, delta_rule=lin, layer_types=["linear_attention"] * 2)
    conv_dim = 2 * 2 * 8 + 4 * 8
    per_layer = 2 * 32 * (conv_dim + 4 * 8 + 2 * 4) + 2 * 4 * 8 * 32 + 2 * conv_dim * 4 + 7 * 4 * 8 * 8
    state = 4 * 8 * 8 * 4 + conv_dim * 3 * 2                        # float32 state + bf16 conv tail
    for p in (1, 1 << 20):
        assert attention_flops_per_token(gdn, p) == 2 * per_layer
        assert kv_read_bytes_per_token(gdn, p) == 2 * state
    assert kv_bytes_per_token(gdn, 1000) == pytest.approx(2 * state / 1000)
