"""transformers checkpoints -> attnzoo: logits of tiny random models written by transformers itself.

Each case builds a tiny random transformers model, randomises every norm weight and bias (they init to
ones / zeros, which would hide a norm or bias bug), saves it with `save_pretrained` (safetensors), loads
it with `attnzoo.load_model` and compares fp32 logits on random token ids (batch 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

import attnzoo
from attnzoo.engine.simple import GenerationConfig, generate
from attnzoo.models import ModelLoadError
from attnzoo.models.hf_loader import config_from_hf

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            initializer_range=0.1, rms_norm_eps=1e-5, attn_implementation="eager",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def rope(kind: str, **kw: Any) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **kw}}


# name -> (family, config overrides, sequence length)
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4), 40),
    "llama-gqa": ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2), 40),
    "llama-mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1), 40),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True), 40),
    "llama-tied": ("llama", dict(tie_word_embeddings=True), 40),
    "llama-rope-linear": ("llama", rope("linear", factor=4.0), 64),
    "llama-rope-llama3": ("llama", rope("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=16), 64),
    "llama-rope-yarn": ("llama", dict(**rope("yarn", factor=4.0, original_max_position_embeddings=16),
                                      max_position_embeddings=64), 64),
    "mistral-swa": ("mistral", dict(sliding_window=8), 40),
    "qwen3": ("qwen3", dict(), 40),
    "qwen3-swa": ("qwen3", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                                max_window_layers=1), 40),
}


def make_hf(family: str, overrides: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    cfg_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def save(model: torch.nn.Module, path: Path, **kw: Any) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def random_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    scale = theirs.abs().max().item()
    assert scale > 0.5 and theirs.std().item() > 0.05, f"logits too small to mean anything (max |x| {scale})"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * max(1.0, scale))


def check_case(name: str, path: Path) -> None:
    family, overrides, seq = CASES[name]
    hf = make_hf(family, overrides)
    save(hf, path)
    ours = attnzoo.load_model(path)
    ids = random_ids(2, seq)
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours(ids)
    assert_logits_match(mine, theirs)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    check_case(name, tmp_path)


def test_case_configs_mean_what_they_say(tmp_path: Path) -> None:
    """Guard against a case silently testing the default path (e.g. no layer actually sliding)."""
    qwen = make_hf(*CASES["qwen3-swa"][:2])
    assert qwen.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    cfg = attnzoo.load_model(save(qwen, tmp_path / "q")).config
    assert cfg.layer_types == qwen.config.layer_types and cfg.sliding_window == 8
    mistral = attnzoo.load_model(save(make_hf(*CASES["mistral-swa"][:2]), tmp_path / "m")).config
    assert set(mistral.layer_types) == {"sliding_attention"} and mistral.sliding_window == 8
    tied = attnzoo.load_model(save(make_hf(*CASES["llama-tied"][:2]), tmp_path / "t"))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    for kind in ("linear", "llama3", "yarn"):
        cfg = attnzoo.load_model(save(make_hf(*CASES[f"llama-rope-{kind}"][:2]), tmp_path / kind)).config
        assert cfg.rope_scaling["rope_type"] == kind


def test_qwen3_layer_types_derived_without_layer_types_key() -> None:
    """Older Qwen3 config.json files carry use_sliding_window/max_window_layers but no layer_types:
    transformers then slides only layers >= max_window_layers, and so must we."""
    raw = Qwen3Config(**{**BASE, **CASES["qwen3-swa"][1]}).to_dict()
    expected = raw.pop("layer_types")
    cfg = config_from_hf(raw)
    assert cfg.layer_types == expected == ["full_attention", "sliding_attention", "sliding_attention"]
    off = Qwen3Config(**{**BASE, "use_sliding_window": False, "sliding_window": 8}).to_dict()
    off.pop("layer_types")
    assert set(config_from_hf(off).layer_types) == {"full_attention"}


def test_qwen3_swa_legacy_config_logits(tmp_path: Path) -> None:
    family, overrides, seq = CASES["qwen3-swa"]
    hf = make_hf(family, overrides)
    save(hf, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("layer_types")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ids = random_ids(2, seq)
    with torch.no_grad():
        assert_logits_match(attnzoo.load_model(tmp_path)(ids), hf(ids).logits)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    hf = make_hf("llama", {})
    save(hf, tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    ids = random_ids(2, 40)
    with torch.no_grad():
        assert_logits_match(attnzoo.load_model(tmp_path)(ids), hf(ids).logits)


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    hf = make_hf("llama", {})
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    save(hf, tmp_path)
    ours = attnzoo.load_model(tmp_path)
    prompt = random_ids(1, 12, seed=5)
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16,
                          min_new_tokens=16, eos_token_id=None, pad_token_id=0)
    theirs = out[0, prompt.shape[1]:].tolist()
    mine = generate(ours, prompt[0].tolist(), GenerationConfig(max_tokens=16))
    assert len(theirs) == 16
    assert mine == theirs


# ---- bad input -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(make_hf("llama", {}), tmp_path_factory.mktemp("good"))


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_directory_without_config(tmp_path: Path, good_dir: Path) -> None:
    d = copy_dir(good_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        attnzoo.load_model(d)


def test_unsupported_model_type_lists_supported(tmp_path: Path, good_dir: Path) -> None:
    d = copy_dir(good_dir, tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError) as e:
        attnzoo.load_model(d)
    msg = str(e.value)
    assert "gpt2" in msg and all(t in msg for t in ("llama", "mistral", "qwen3"))


def test_missing_tensor_is_named(tmp_path: Path, good_dir: Path) -> None:
    d = copy_dir(good_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    gone = "model.layers.1.mlp.up_proj.weight"
    del tensors[gone]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=gone.replace(".", r"\.")):
        attnzoo.load_model(d)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path: Path, good_dir: Path, damage: str) -> None:
    d = copy_dir(good_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x13\x37not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="safetensors"):
        attnzoo.load_model(d)


def test_unknown_model_name_lists_known() -> None:
    with pytest.raises(ModelLoadError, match="smollm2"):
        attnzoo.load_model("nope")
