"""The mechanism registry: every family builds through it from a small random config, every family's
config survives the JSON round trip of native checkpoints, the layers a family builds declare only the cache
kinds it names, the tables (layer types, readers, contestants) come from the registered families, and
DecoderLM passes each config through whole (KDA's gate_lower_bound used to be dropped outside GLM-5.3-Flash)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from attnzoo.layers.batch import Batch
from attnzoo.mechanisms import (Family, build_attention, by_mechanism, config_types, families, family_of, layer_cost,
                                layer_mechanisms, register, unregister)
from attnzoo.models.config import ModelConfig
from attnzoo.models.decoder import DecoderLM
from attnzoo.models.native import config_from_json, config_to_json
from attnzoo.models.weights import model_class

BASE = dict(architecture="attnzoo", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=256)
MLA = dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
DSA = dict(index_n_heads=2, index_head_dim=8, index_topk=4)
KDA = dict(kind="kda", num_k_heads=4, num_v_heads=4, k_dim=8, v_dim=8, conv_width=4, gate_lower_bound=-3.0)
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1)

# one small config per registry key
CONFIGS_BY_MECHANISM = {
    "softmax": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "mla": dict(attention_type="mla", mla=MLA, head_dim=4),
    "dsa": dict(attention_type="mla", mla=MLA, head_dim=4, dsa=DSA),
    "msa": dict(msa=dict(index_head_dim=8, block_size=4, topk_blocks=2), layer_types=["sparse_attention"] * 2),
    "nsa": dict(nsa=dict(block_len=4, stride=2, select_block=4, num_selected=2, window=8),
                layer_types=["nsa"] * 2),
    "gdn": dict(delta_rule=dict(kind="gdn", num_k_heads=2, num_v_heads=4, k_dim=8, v_dim=8),
                layer_types=["linear_attention", "full_attention"]),
    "kda": dict(delta_rule=KDA, layer_types=["linear_attention", "full_attention"], moe=MOE),
}
MECHANISMS = sorted(by_mechanism())


def test_every_mechanism_has_a_config():
    assert set(CONFIGS_BY_MECHANISM) == set(MECHANISMS)


@pytest.mark.parametrize("name", MECHANISMS)
def test_builds_runs_and_costs_through_the_registry(name):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, **CONFIGS_BY_MECHANISM[name]})
    assert name in layer_mechanisms(cfg)
    idx = layer_mechanisms(cfg).index(name)
    layer = build_attention(cfg, idx)
    assert type(layer) is type(model_class(cfg)(cfg).layers[idx].attn)
    model = model_class(cfg)(cfg).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, BASE["vocab_size"], (1, 12)))
    assert logits.shape == (1, 12, BASE["vocab_size"]) and torch.isfinite(logits).all()
    flops, read = layer_cost(cfg, idx, 100)
    assert flops > 0 and read > 0
    specs = layer.cache_spec()
    assert {s.kind for s in (specs if isinstance(specs, tuple) else (specs,))} <= set(family_of(cfg, idx).cache_kinds)


@pytest.mark.parametrize("name", MECHANISMS)
def test_config_round_trips_through_json(name):
    cfg = ModelConfig(**{**BASE, **CONFIGS_BY_MECHANISM[name]})
    raw = json.loads(json.dumps(config_to_json(cfg)))   # what a native checkpoint's config.json holds
    back = config_from_json(raw)
    assert back == cfg
    for field, cls in config_types().items():        # typed again after the trip, not dicts
        value = getattr(back, field)
        assert value is None or isinstance(value, cls)
        if value is not None:
            assert dataclasses.asdict(value) == raw[field]


def test_legacy_native_config_without_new_defaults_loads():
    """config.json files written before the typed configs: dicts lacking the keys that now have defaults."""
    raw = {"model_type": "attnzoo", **BASE, "attention_type": "mla", "mla": MLA, "dsa": DSA,
           "moe": {k: v for k, v in MOE.items()}, "layer_types": ["full_attention"] * 2}
    cfg = config_from_json(raw)
    assert cfg.mla.rope_interleave and cfg.dsa.indexer_types == ["full", "full"] and cfg.moe.kind == "deepseek"


def test_unknown_family_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig(**{**BASE, **CONFIGS_BY_MECHANISM["kda"], "delta_rule": {**KDA, "bogus": 1}})


def test_native_configs_written_before_the_rename_load():
    """The delta rule's config was the field "linear" before the family had one name."""
    raw = {"model_type": "attnzoo", **BASE, "linear": KDA, "layer_types": ["linear_attention", "full_attention"]}
    cfg = config_from_json(raw)
    assert cfg.delta_rule.gate_lower_bound == -3.0 and layer_mechanisms(cfg) == ["kda", "softmax"]


def test_layers_go_to_the_family_that_applies():
    """Softmax unless a configured family claims the layer type; DSA refines MLA; a missing config is named."""
    cfg = ModelConfig(**{**BASE, **CONFIGS_BY_MECHANISM["dsa"]})
    assert layer_mechanisms(cfg) == ["dsa", "dsa"]
    with pytest.raises(ValueError, match="linear_attention layers need the delta_rule parameters"):
        ModelConfig(**{**BASE, "layer_types": ["linear_attention", "full_attention"]})
    with pytest.raises(ValueError, match="unsupported layer types"):
        ModelConfig(**{**BASE, "layer_types": ["full_attention", "bogus_attention"]})


def test_register_refuses_what_another_family_owns():
    with pytest.raises(ValueError, match="mechanism kda of 'other' belongs to 'delta_rule'"):
        register(Family("other", layer_types=("x",), mechanisms=("kda",), build=build_attention))
    with pytest.raises(ValueError, match="model_type llama of 'other' belongs to 'softmax'"):
        register(Family("other", readers={"llama": lambda raw: {}}))
    with pytest.raises(ValueError, match="registered already"):
        register(Family("softmax"))
    register(Family("other"))   # nothing taken: fine, and gone again
    unregister("other")
    assert "other" not in {f.name for f in families()}


def test_kda_layer_built_by_decoderlm_carries_gate_lower_bound():
    cfg = ModelConfig(**{**BASE, **CONFIGS_BY_MECHANISM["kda"]})
    model = DecoderLM(cfg)
    assert model.layers[0].attn.gate_lower_bound == -3.0
    # and it is used: the safe gate changes the output
    torch.manual_seed(0)
    x = torch.randn(6, BASE["hidden_size"])
    batch = Batch.dense(1, 6, 0, x.device, None)
    layer = model.layers[0].attn
    with torch.no_grad():
        for p in layer.parameters():   # some start at zero (conv): random values so the gate matters
            p.normal_(0, 0.5)
        bounded = layer(x, None, batch)
        layer.gate_lower_bound = None
        free = layer(x, None, batch)
    assert not torch.allclose(bounded, free)
