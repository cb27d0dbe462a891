"""QuantLinear against nn.Linear, its state dict, and quantize_model on a tiny DecoderLM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnzoo.engine import GenerationConfig, generate
from attnzoo.layers.quant import QuantLinear, quantize_model
from attnzoo.models import DecoderLM, ModelConfig
from attnzoo.ops.quant import dequantize


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny() -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    return DecoderLM(cfg).eval()


# stated tolerances vs the float linear on Gaussian-like weights (4 bits per group of 32; 8 bits per row)
TOL = {"int4": 0.1, "int8": 0.01}


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quant_linear_vs_linear(kind):
    torch.manual_seed(1)
    lin = nn.Linear(128, 48)
    q = QuantLinear.from_linear(lin, kind)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        want = lin(x)
    got = q(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert rel(got, want) < TOL[kind]
    assert rel(got, x @ dequantize(q.qweight).T + lin.bias) < 1e-5  # exactly its own weights
    qb = q.to(torch.bfloat16)  # scales (and bias) become bf16: compute in bf16, codes unchanged
    assert qb.packed.dtype in (torch.uint8, torch.int8) and qb.scales.dtype == torch.bfloat16
    yb = qb(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel(yb, want) < TOL[kind] + 1e-2


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_state_dict_round_trip(kind):
    torch.manual_seed(2)
    a = QuantLinear.from_linear(nn.Linear(64, 32), kind)
    b = QuantLinear.from_linear(nn.Linear(64, 32), kind)  # same shapes, other values
    x = torch.randn(3, 64)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"packed", "scales", "bias"}


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantize_model(kind):
    model, ref = tiny(), tiny()
    names = quantize_model(model, kind, skip=("lm_head",))
    assert len(names) == 2 * 4 and "lm_head" not in names  # qkv, o, gate_up, down per layer
    assert set(names.values()) == {kind}
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert rel(model(ids), ref(ids)) < TOL[kind]
    assert len(generate(model, [3, 5, 7], GenerationConfig(max_tokens=5))) == 5
    assert quantize_model(model, kind, overrides={}) == {"lm_head": kind}  # the rest are already quantised
    with torch.no_grad():
        assert rel(model(ids), ref(ids)) < 2 * TOL[kind]


def test_default_lm_head_int8_and_overrides():
    model = tiny()
    kinds = quantize_model(model)
    assert kinds["lm_head"] == "int8" and kinds["layers.0.mlp.down_proj"] == "int4"
    model = tiny()
    kinds = quantize_model(model, overrides={"lm_head": None, "down_proj": "int8"})
    assert "lm_head" not in kinds and kinds["layers.1.mlp.down_proj"] == "int8"


def test_ineligible_shapes_stay_float():
    m = nn.Sequential(nn.Linear(48, 32), nn.Linear(32, 24), nn.Linear(32, 32))
    assert quantize_model(m, "int4") == {"2": "int4"}  # K 48 not a multiple of 32; N 24 not of 16
    assert isinstance(m[0], nn.Linear) and isinstance(m[2], QuantLinear)
