"""RoPE tables and rotation against transformers' own functions (the oracle) and a hand rotation."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.ops.rope import apply_rope, rope_cos_sin, rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

CASES = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["rope_type"])
def test_frequencies_match_transformers(case):
    theta, head_dim = 5e5, 64
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=512,
                      rope_parameters={**case, "rope_theta": theta})
    if case["rope_type"] == "default":
        want = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        want_factor = 1.0
    else:
        want, want_factor = ROPE_INIT_FUNCTIONS[case["rope_type"]](cfg, "cpu")
    got, factor = rope_frequencies(head_dim, theta, None if case["rope_type"] == "default" else case, 512)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(want_factor)


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError, match="supported"):
        rope_frequencies(64, 1e4, {"rope_type": "longrope", "factor": 2.0})


def test_rotation_by_hand_half_split_interleaved_partial():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 30, 100])
    inv, _ = rope_frequencies(8, 100.0)  # partial: 8 of 12 dims rotate
    cos, sin = rope_cos_sin(pos, inv)
    for interleaved in (False, True):
        out = apply_rope(x, cos.double(), sin.double(), interleaved=interleaved)
        want = x.clone()
        for n in range(5):
            for i in range(4):
                a = pos[n].item() * inv[i].item()
                j, k = (2 * i, 2 * i + 1) if interleaved else (i, i + 4)
                want[n, :, j] = x[n, :, j] * math.cos(a) - x[n, :, k] * math.sin(a)
                want[n, :, k] = x[n, :, k] * math.cos(a) + x[n, :, j] * math.sin(a)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(out[..., 8:], x[..., 8:])
