"""GLM-5.3-Flash (glm5_next, text part) -> attnzoo, against transformers' own model code.

A tiny random Glm5NextForConditionalGeneration (the smallest vision tower) written by save_pretrained, 8
layers (KDA x3, k-pool DSA, x2), MoE on every other layer, hc_mult 2, with every zero/one-initialised
parameter randomised: norms, the indexer LayerNorm, A_log (zero under the safe gate), dt_bias, the k-pool gate
(ones) and position table (zeros), the router bias and the mHC base / scale. swiglu_limit is small so the
clamp bites. Prompts are longer than index_topk, so the k-pool selection decides the output. transformers runs
its pure-PyTorch KDA (fla-core must not be importable).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Glm5NextConfig, Glm5NextForConditionalGeneration

import attnzoo
from attnzoo.engine import GenerationConfig, generate
from attnzoo.layers import IndexerKeys, LatentKV, RecurrentState
from attnzoo.layers.delta import KimiDeltaAttention
from attnzoo.layers.dsa_kpool import KPoolDSAttention
from attnzoo.layers.hyper import HyperConnection
from attnzoo.models.glm5_next import Glm5NextLM
from attnzoo.models.hf_loader import config_from_hf
from tests.hf_oracle import random_hf

VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=0, v_head_dim=16, index_topk=8, index_head_dim=16, index_n_heads=16, index_kpool=4,
            linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4, hc_mult=2, n_routed_experts=4,
            num_experts_per_tok=2, pad_token_id=0, max_position_embeddings=256, initializer_range=0.1,
            mlp_layer_types=["dense", "sparse"] * 4, swiglu_limit=1.0)
VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64,
              projection_intermediate_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: OpenMP threads only contend on the shared 2-core machine (10x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_hf(seed: int = 0, **text) -> Glm5NextForConditionalGeneration:
    cfg = Glm5NextConfig(text_config={**TEXT, **text}, vision_config=VISION)
    cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"

    def redraw(name: str, p: torch.Tensor) -> None:
        if "visual" in name:
            return
        if name.endswith(("layernorm.weight", "o_norm.weight", "k_norm.weight", "language_model.norm.weight")):
            p.uniform_(0.5, 1.5)
        elif name.endswith((".bias", "A_log", "dt_bias", "_hc.base")):
            p.normal_(0.0, 0.5)
        elif name.endswith("_hc.scale"):
            p.uniform_(0.5, 1.5)
        elif name.endswith("_hc.fn"):
            p.normal_(0.0, 0.2)
        elif name.endswith("index_kpool_compress_gate"):
            p.normal_(0.0, 0.5)
        elif name.endswith("index_kpool_compress_ape"):
            p.normal_(0.0, 1.0)
    return random_hf(Glm5NextForConditionalGeneration, cfg, redraw, seed)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Glm5NextForConditionalGeneration, Glm5NextLM]:
    path = tmp_path_factory.mktemp("glm5_next")
    hf = make_hf()
    hf.save_pretrained(path, safe_serialization=True)
    return hf, attnzoo.load_model(path)


def test_logits_match_transformers(models) -> None:
    hf, ours = models
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))   # 40 tokens, top-8
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
    scale = theirs.abs().max().item()
    assert scale > 0.5 and theirs.std().item() > 0.05, f"logits too small to mean anything (max |x| {scale})"
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * max(1.0, scale))


def test_greedy_generation_matches_transformers(models) -> None:
    """Prefill, then 32 decode steps through the ContiguousKVCache: KDA conv/delta states, the latent rows
    and the [k_I | z] indexer rows from which the pools are rebuilt every step."""
    hf, ours = models
    prompt = torch.randint(3, VOCAB, (1, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                           min_new_tokens=32)[0, 21:].tolist()
    assert generate(ours, prompt[0].tolist(), GenerationConfig(max_tokens=32)) == want


def _pool_scores(ix, x: torch.Tensor, q_resid: torch.Tensor) -> torch.Tensor:
    """The spec (docs/mechanisms/sparse.md §6) written out for one sequence: [T, complete pools] scores."""
    T, P, H, d = x.shape[0], ix.index_kpool, ix.n_heads, ix.head_dim
    q = ix.wq_b(q_resid).view(T, H, d)
    k = torch.nn.functional.layer_norm(ix.wk(x), (d,), ix.k_norm.weight, ix.k_norm.bias, 1e-6)
    n = T // P
    lg = (x @ ix.index_kpool_compress_gate.T)[: n * P].view(n, P, d) + ix.index_kpool_compress_ape
    pooled = (lg.softmax(1) * k[: n * P].view(n, P, d)).sum(1)
    s = torch.relu(torch.einsum("thd,pd->thp", q, pooled) / d ** 0.5)
    return torch.einsum("th,thp->tp", ix.weights_proj(x) / H ** 0.5, s)


def test_kpool_selection_matches_transformers_indexer(models) -> None:
    """Our selection (layer 3) on transformers' indexer inputs equals its indices as sets, on every row
    whose pool scores have no tie at the top-k boundary (ReLU zeros tie exactly)."""
    hf, ours = models
    got = {}

    def keep(module, args, kwargs, out) -> None:  # returns None: the output stays
        got.setdefault("io", (kwargs, out))

    ix = hf.model.language_model.layers[3].self_attn.indexer
    h = ix.register_forward_hook(keep, with_kwargs=True)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf(ids)
        h.remove()
        kw, theirs = got["io"]
        x, q_resid = kw["hidden_states"][0], kw["q_resid"][0]
        layer = ours.layers[3].attn
        q, rows, w = layer.indexer(x, q_resid, None)
        mine = layer._select(q[None], w[None], rows[None], None)[0]
        scores = _pool_scores(ix, x, q_resid)
    P, kp = 4, 2
    assert mine.shape == theirs[0].shape == (40, 8 + P - 1)
    checked = 0
    for t in range(40):
        cand = scores[t, : (t + 1) // P].sort(descending=True).values
        if len(cand) > kp and (cand[kp - 1] - cand[kp]).abs() < 1e-6:
            continue  # a tie at the boundary: either choice is right
        checked += 1
        assert set(mine[t].tolist()) - {-1} == set(theirs[0, t].tolist()) - {-1}, t
        assert {t - t % P + j for j in range(t % P + 1) if (t + 1) % P} <= set(mine[t].tolist())  # the tail
    assert checked >= 30


def test_selection_matters(models) -> None:
    """Without exclusions (top-k as long as the context) the late logits change; the early ones, where
    the top pools and the tail already cover every token, do not."""
    _, ours = models
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    sparse_layers = [layer.attn for layer in ours.layers if isinstance(layer.attn, KPoolDSAttention)]
    with torch.no_grad():
        sparse = ours(ids)
        for a in sparse_layers:
            a.index_topk = 10_000
        dense = ours(ids)
        for a in sparse_layers:
            a.index_topk = 8
    assert (sparse[:, :8] - dense[:, :8]).abs().max() < 1e-5      # 2 pools + tail: nothing excluded yet
    assert (sparse[:, 20:] - dense[:, 20:]).abs().max() > 1e-3


def test_configs_mean_what_they_say(models) -> None:
    _, ours = models
    assert type(ours) is Glm5NextLM and ours.rotary is None          # NoPE everywhere
    kda, dsa = RecurrentState(conv_dim=3 * 64, conv_width=4, num_heads=4, k_dim=16, v_dim=16), \
        (LatentKV(16), IndexerKeys(32))                               # [k_I | z] per token
    assert ours.cache_specs() == [kda, kda, kda, dsa] * 2
    assert [type(layer.attn) for layer in ours.layers[:4]] == [KimiDeltaAttention] * 3 + [KPoolDSAttention]
    assert ours.layers[0].attn.gate_lower_bound == -5.0 and ours.layers[3].attn.index_kpool == 4
    assert [type(layer.mlp).__name__ for layer in ours.layers] == ["SwiGLU", "DeepseekMoE"] * 4
    assert ours.layers[1].mlp.clamp.limit == 1.0 and ours.layers[1].mlp.shared_experts.clamp.limit == 1.0
    # transformers' defaults: 3:1 KDA:DSA, the first 3 MLPs dense, NoPE, safe gate -5, IndexShare off
    raw = {k: v for k, v in TEXT.items() if k != "mlp_layer_types"}
    cfg = config_from_hf({"model_type": "glm5_next", "text_config": {**raw, "num_hidden_layers": 6}})
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 2
    assert cfg.mlp_layer_types == ["dense"] * 3 + ["sparse"] * 3 and cfg.dsa.indexer_types == ["full"] * 6
    assert cfg.delta_rule.gate_lower_bound == -5.0 and cfg.rms_norm_eps == 1e-5 and cfg.hyper.hc_mult == 2
    flat = config_from_hf({**raw, "model_type": "glm5_next_text", "linear_attn_config": {"gate_lower_bound": None,
                                                                                        "safe_gate": False}})
    assert flat.delta_rule.gate_lower_bound is None   # Kimi's softplus gate


def test_clamp_matters(models) -> None:
    """The checks above would not see a missing clamp if it never bit."""
    hf, ours = models
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    mlps = [layer.mlp for layer in ours.layers]
    clamps = [m.clamp for m in mlps]
    with torch.no_grad():
        want = hf(ids).logits
        for m in mlps:
            m.clamp = None
        unclamped = ours(ids)
        for m, c in zip(mlps, clamps):
            m.clamp = c
    assert (unclamped - want).abs().max() > 1e-3


def test_four_streams_match_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hc_mult 4 (the released value): with 2 streams every doubly-stochastic mixing matrix is symmetric,
    so only more streams tell comb from its transpose."""
    hf = make_hf(seed=1, hc_mult=4, num_hidden_layers=4, mlp_layer_types=["dense", "sparse"] * 2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = attnzoo.load_model(tmp_path)
    assert ours.layers[0].attn_hc.fn.shape == (6 * 4, 4 * 64)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf(ids).logits
        scale = want.abs().max().item()
        torch.testing.assert_close(ours(ids), want, rtol=1e-4, atol=1e-4 * max(1.0, scale))
        monkeypatch.setattr(HyperConnection, "expand", staticmethod(
            lambda out, streams, post, comb: post[..., None] * out[:, None, :] + comb @ streams))
        assert (ours(ids) - want).abs().max() > 1e-3


def test_index_share_across_kda_layers(tmp_path: Path) -> None:
    """IndexShare (layer 7 "shared"): transformers 5.24 cannot run it in glm5_next (its KDA layers drop the
    indices); we reuse the step's selection of the last full layer (3), as glm_moe_dsa does."""
    hf = make_hf(index_topk_pattern="FFFFFFFS")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="Shared DSA layers require top-k indices"), torch.no_grad():
        hf(ids)
    ours = attnzoo.load_model(tmp_path)
    assert ours.config.dsa.indexer_types[7] == "shared" and not hasattr(ours.layers[7].attn, "wq_b")
    assert ours.cache_specs()[7] == LatentKV(16)
    seen = []
    hook = lambda m, a, out: seen.append([s.clone() for s in a[2].shared["dsa_selection"]])  # noqa: E731
    for i in (3, 7):
        ours.layers[i].attn.register_forward_hook(hook)
    with torch.no_grad():
        assert torch.isfinite(ours(ids)).all()
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(*seen))
