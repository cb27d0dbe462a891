"""A mechanism family defined entirely in this file and added with one call, `attnzoo.mechanisms.register`:
NoPE softmax attention with a learned per-head logit temperature, on a layer type, config, transformers
model_type, tensor names, cost and arena contestant of its own. Nothing in the package names it, yet the
normal loader reads its checkpoint (logits checked against a float64 reference written here), the engine
serves it with prefix caching (tokens equal to caching off and to a greedy loop over the full forward), the
native format round-trips its config, and the arena trains its contestant."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import attnzoo
from attnzoo.arena import data
from attnzoo.arena.costs import attention_flops_per_token, kv_bytes_per_token
from attnzoo.arena.mechanisms import DESCRIPTIONS, MECHANISMS, Shape, parse_mechanisms
from attnzoo.arena.train import TrainConfig, build, train
from attnzoo.engine import LLM, SamplingParams
from attnzoo.layers import Batch, CacheKind, FullKV
from attnzoo.mechanisms import Contestant, Family, layer_mechanisms, register, unregister
from attnzoo.models.native import save_native
from attnzoo.models.sharding import check_tensor_parallel

LAYER_TYPE, MODEL_TYPE = "temperature_attention", "temperature_lm"


@dataclass
class TemperatureConfig:
    num_kv_heads: int
    scale: float            # the logit scale the learned temperature multiplies


class TemperatureAttention(nn.Module):
    """softmax(q.k * scale * exp(log_temperature[h])) v, no positional encoding; the temperature is folded
    into q, so the cache handle's `attend` serves training, the reference generator and paged decode."""

    def __init__(self, idx: int, hidden: int, heads: int, kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.idx, self.heads, self.kv_heads, self.head_dim, self.scale = idx, heads, kv_heads, head_dim, scale
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.log_temperature = nn.Parameter(torch.zeros(heads))

    def cache_spec(self) -> FullKV:
        return FullKV(self.kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, rope: object, batch: Batch) -> torch.Tensor:
        n, d = x.shape[0], self.head_dim
        q = self.q_proj(x).view(n, self.heads, d) * self.log_temperature.exp()[:, None]
        k, v = self.k_proj(x).view(n, self.kv_heads, d), self.v_proj(x).view(n, self.kv_heads, d)
        return self.o_proj(batch.attend(self.idx, q, k, v, scale=self.scale).reshape(n, -1))


NAMES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "log_temperature")


def cost(cfg, idx: int, context: int) -> tuple[float, float]:
    H, Hkv, d, D = cfg.num_heads, cfg.temperature.num_kv_heads, cfg.head_dim, cfg.hidden_size
    flops = 2 * H * context * 2 * d + 2 * D * (H + 2 * Hkv) * d + 2 * H * d * D
    return float(flops), float(context * Hkv * 2 * d * 2)


FAMILY = Family(
    "temperature", title="temperature attention", config=TemperatureConfig, field="temperature",
    layer_types=(LAYER_TYPE,), cache_kinds=(CacheKind.KV,), cost=cost,
    build=lambda cfg, idx: TemperatureAttention(idx, cfg.hidden_size, cfg.num_heads, cfg.temperature.num_kv_heads,
                                                cfg.head_dim, cfg.temperature.scale),
    hf_weights=lambda cfg, tensors, src, dst, idx: {dst + n: tensors[f"{src}temp_attn.{n}"] for n in NAMES},
    readers={MODEL_TYPE: lambda raw: dict(
        layer_types=[LAYER_TYPE] * raw["num_hidden_layers"],
        temperature=TemperatureConfig(raw["temperature_kv_heads"], raw["temperature_scale"]))},
    contestants=(Contestant("temperature", lambda s: dict(
        layer_types=[LAYER_TYPE] * s.layers, temperature=TemperatureConfig(s.kv_heads, s.head_dim ** -0.5)),
        "softmax attention with a learned temperature per head"),))


@pytest.fixture(scope="module", autouse=True)
def registered():
    register(FAMILY)
    yield
    unregister(FAMILY.name)


# ---- a tiny random transformers-style checkpoint -------------------------------------------------------------
CONFIG = dict(model_type=MODEL_TYPE, vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-6,
              max_position_embeddings=128, tie_word_embeddings=False, temperature_kv_heads=2,
              temperature_scale=0.3)


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random and non-zero (norms and temperatures too, so a dropped one shows)."""
    g = torch.Generator().manual_seed(seed)
    c = CONFIG
    D, H, Hkv, d, I, V = (c["hidden_size"], c["num_attention_heads"], c["temperature_kv_heads"], c["head_dim"],
                          c["intermediate_size"], c["vocab_size"])
    rand = lambda *shape, std=0.3: torch.randn(*shape, generator=g) * std  # noqa: E731
    norm = lambda: 1 + rand(D, std=0.2)  # noqa: E731
    out = {"model.embed_tokens.weight": rand(V, D, std=1.0), "model.norm.weight": norm(), "lm_head.weight": rand(V, D)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                    p + "temp_attn.q_proj.weight": rand(H * d, D), p + "temp_attn.k_proj.weight": rand(Hkv * d, D),
                    p + "temp_attn.v_proj.weight": rand(Hkv * d, D), p + "temp_attn.o_proj.weight": rand(D, H * d),
                    p + "temp_attn.log_temperature": rand(H, std=0.5),
                    p + "mlp.gate_proj.weight": rand(I, D), p + "mlp.up_proj.weight": rand(I, D),
                    p + "mlp.down_proj.weight": rand(D, I)})
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("temperature_lm")
    tensors = random_tensors(0)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path, tensors


def reference_logits(t: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """The model written out in float64: embed, (RMSNorm, temperature attention, RMSNorm, SwiGLU) per layer."""
    w = {k: v.double() for k, v in t.items()}
    c, T = CONFIG, len(ids)
    H, Hkv, d = c["num_attention_heads"], c["temperature_kv_heads"], c["head_dim"]
    rms = lambda x, g: x / (x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]).sqrt() * g  # noqa: E731
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.temp_attn."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[a + "q_proj.weight"].T).view(T, H, d)
        k, v = ((h @ w[a + n + "_proj.weight"].T).view(T, Hkv, d).repeat_interleave(H // Hkv, 1) for n in "kv")
        s = torch.einsum("thd,shd->hts", q, k) * c["temperature_scale"] * w[a + "log_temperature"].exp()[:, None, None]
        o = torch.einsum("hts,shd->thd", s.masked_fill(future, -math.inf).softmax(-1), v)
        x = x + o.reshape(T, H * d) @ w[a + "o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_the_loader_reads_it_and_the_forward_matches_a_float64_reference(checkpoint, tmp_path):
    path, tensors = checkpoint
    model = attnzoo.load_model(path)
    cfg = model.config
    assert isinstance(cfg.temperature, TemperatureConfig) and cfg.temperature.num_kv_heads == 2
    assert layer_mechanisms(cfg) == ["temperature", "temperature"]
    ids = torch.randint(0, CONFIG["vocab_size"], (20,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(got.double(), reference_logits(tensors, ids), rtol=1e-4, atol=1e-4)
    # attnzoo's own format keeps the plug-in's config (as JSON) and loads back to the same model
    again = attnzoo.load_model(save_native(model, tmp_path / "native"))
    assert again.config == cfg and isinstance(again.config.temperature, TemperatureConfig)
    with torch.no_grad():
        torch.testing.assert_close(again(torch.tensor([ids]))[0], got)
    with pytest.raises(ValueError, match="temperature attention"):   # no sharding rules: refused, by name
        check_tensor_parallel(cfg, 2)


def test_the_engine_serves_it_with_prefix_caching(checkpoint):
    path, _ = checkpoint
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, CONFIG["vocab_size"], (41,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, CONFIG["vocab_size"], (k,), generator=g).tolist() for k in (5, 7)]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def serve(caching: bool) -> tuple[list[list[int]], list[int]]:
        llm = LLM(path, dtype="float32", device="cpu", page_size=4, max_num_seqs=2, kv_cache_memory=4 << 20,
                  enable_prefix_caching=caching)
        outs = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts]   # the second finds the first's pages
        llm.check_integrity()
        return [o.token_ids for o in outs], [o.cached_tokens for o in outs]

    tokens, cached = serve(True)
    uncached, none = serve(False)
    assert cached[1] > 0 and not any(none)
    assert tokens == uncached
    model = attnzoo.load_model(path)
    for prompt, got in zip(prompts, tokens):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(greedy.max_tokens):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert ids[len(prompt):] == got


def test_the_arena_trains_its_contestant(tmp_path):
    assert "temperature" in MECHANISMS and parse_mechanisms("temperature,gqa") == ["gqa", "temperature"]
    assert DESCRIPTIONS["temperature"] == "softmax attention with a learned temperature per head"
    shape = Shape(vocab_size=data.VOCAB_SIZE, hidden=32, layers=2, heads=4, head_dim=8, intermediate=64, seq_len=32,
                  max_positions=128)
    cfg = MECHANISMS["temperature"](shape)
    assert attention_flops_per_token(cfg, 100) > 0 and kv_bytes_per_token(cfg, 100) == 2 * 2 * 2 * 8 * 2
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(200)).encode()
    arr = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    corpus = data.Corpus(train=arr[:-1000], val=arr[-1000:], files=1, val_files=1, fingerprint="synthetic")
    tc = TrainConfig(steps=1, batch_size=2, seq_len=32, mqar_tokens=64, mqar_lengths=(32,), eval_every=1,
                     ckpt_every=1, eval_windows=2, seed=0)
    model, hist = train("temperature", cfg, tc, corpus, data.val_windows(corpus.val, 32, 2), tmp_path,
                        progress=False)
    assert len(hist.lm) == 1 and math.isfinite(hist.lm[0]) and math.isfinite(hist.val[0])
    start = dict(build(cfg, seed=0).named_parameters())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert {f"layers.{i}.attn.{n}" for i in range(2) for n in NAMES} <= set(moved)
