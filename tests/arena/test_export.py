"""A trained arena model is a directory the loader, the engine and the CLI take: identical logits after the
round trip, byte-level tokenizer ids = data.py's ids, greedy engine output = the reference generator's."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo
from attnzoo.arena import data
from attnzoo.arena.export import export_model
from attnzoo.arena.mechanisms import MECHANISMS, Shape
from attnzoo.arena.train import build
from attnzoo.engine import GenerationConfig, generate

SHAPE = Shape(vocab_size=data.VOCAB_SIZE, hidden=32, layers=4, heads=4, head_dim=8, intermediate=96, seq_len=64,
              max_positions=512)


@pytest.mark.parametrize("name", ["gqa", "gdn", "kda_mla_3_1"])
def test_saved_model_loads_and_generates(name, tmp_path):
    model = build(MECHANISMS[name](SHAPE), seed=3).eval()
    path = export_model(model, tmp_path / name)
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "attnzoo" and raw["layer_types"] == model.config.layer_types
    loaded = attnzoo.load_model(path)
    x = torch.randint(0, data.VOCAB_SIZE, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    tok = loaded.tokenizer
    text = "def f(x):\n    return 'é'\n"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>") == [data.IM_END] and data.IM_END in tok.eos_token_ids
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "import os"}]))
    assert prompt[0] == data.IM_START and prompt[-len("assistant\n"):] == list(b"assistant\n")
    ref = generate(loaded, prompt, GenerationConfig(max_tokens=12))
    llm = attnzoo.LLM(path, dtype="float32", max_num_seqs=1, kv_cache_memory=1 << 22)
    out = llm.generate([prompt], attnzoo.SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    assert out.token_ids == ref[:len(out.token_ids)] and (out.finish_reason == "stop" or len(ref) == 12)


def test_cli_generates_from_arena_models_nsa_included(tmp_path, capsys):
    from attnzoo.cli import main
    for mech in ("gqa", "nsa"):   # NSA decodes from its cache (raw K/V rows + compressed rows)
        export_model(build(MECHANISMS[mech](SHAPE), seed=0), tmp_path / mech)
        assert main(["generate", "--model", str(tmp_path / mech), "--raw", "def ", "--max-tokens", "4",
                     "--dtype", "float32"]) == 0, capsys.readouterr().err
    nsa = attnzoo.load_model(tmp_path / "nsa")
    assert nsa(torch.randint(0, 256, (1, 64))).shape == (1, 64, data.VOCAB_SIZE)


def test_bad_checkpoint_directories(tmp_path):
    path = export_model(build(MECHANISMS["gqa"](SHAPE), seed=0), tmp_path / "m")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "flux_capacitor": 1}))
    with pytest.raises(attnzoo.ModelLoadError, match="flux_capacitor"):
        attnzoo.load_model(path)
    (path / "config.json").write_text(json.dumps({**raw, "num_layers": 5}))
    with pytest.raises(attnzoo.ModelLoadError):
        attnzoo.load_model(path)
