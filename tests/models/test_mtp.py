"""DeepSeek-V3 MTP modules (attnzoo/models/mtp.py) against the technical report's equations (§2.2).

transformers' DeepseekV3 drops the MTP weights, so the tiny checkpoints here get random ones written into
their safetensors under the official names (model.layers.{num_hidden_layers}.*). The oracle: transformers'
model for h_i (its last decoder layer's output, before the final norm), transformers' own DeepseekV3DecoderLayer
holding the MTP block's weights for TRM, and the rest written out here. Both sides run in float64, but RMSNorm
statistics and the MoE router are float32 in transformers and here alike, so they agree to fp32 level (1e-5),
not float64's: the tolerance is 1e-4 of the logits' scale; the orders it must tell apart differ by ~1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

import attnzoo
from attnzoo.distributed import ParallelContext
from attnzoo.models import sharding
from tests.models.test_deepseek_v3 import VOCAB, make_hf

N = 2   # the tiny models' num_hidden_layers: the MTP module is layer 2


def make64(overrides: dict[str, Any]) -> torch.nn.Module:
    """The tiny transformers model in float64 (its grouped-GEMM experts take no float64: the eager ones)."""
    hf = make_hf(overrides).double()
    hf.set_experts_implementation("eager")
    return hf


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mtp_tensors(hf: torch.nn.Module, own_head: bool, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random MTP weights under the official names: the block's from a transformers layer, every tensor drawn
    here (a bare layer leaves its experts uninitialised, and norms at one would hide bugs); the embedding
    repeated, as shipped."""
    torch.manual_seed(seed)
    layer = DeepseekV3DecoderLayer(hf.config, N).double()
    with torch.no_grad():
        for name, p in [*layer.named_parameters(), *layer.named_buffers()]:
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1 if name.endswith(("bias", "e_score_correction_bias")) else hf.config.initializer_range)
    H = hf.config.hidden_size
    head = torch.randn(VOCAB, H) * 0.1 if own_head else hf.lm_head.weight.detach().float()
    out = {f"model.layers.{N}.{k}": v.float() for k, v in layer.state_dict().items()}
    out.update({f"model.layers.{N}.{k}": v for k, v in {
        "enorm.weight": torch.rand(H) + 0.5, "hnorm.weight": torch.rand(H) + 0.5,
        "eh_proj.weight": torch.randn(H, 2 * H) * 0.1, "shared_head.norm.weight": torch.rand(H) + 0.5,
        "shared_head.head.weight": head, "embed_tokens.weight": hf.model.embed_tokens.weight.detach().float()}.items()})
    return out


def save(hf: torch.nn.Module, path: Path, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf.save_pretrained(path, safe_serialization=True)
    tensors = {**load_file(path / "model.safetensors"), **extra}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return tensors


def oracle(hf: torch.nn.Module, w: dict[str, torch.Tensor], ids: torch.Tensor, next_ids: torch.Tensor,
           order: str = "eh") -> tuple[torch.Tensor, torch.Tensor]:
    """(h, logits) by the report's equations in float64; order "he" puts the hidden state first."""
    c, p = hf.config, f"model.layers.{N}."
    w = {k[len(p):]: v.double() for k, v in w.items() if k.startswith(p)}
    caught = []
    hook = hf.model.layers[-1].register_forward_hook(lambda m, a, o: caught.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        hook.remove()
        h = caught[0]
        # transformers' last hidden_states entry is after the final norm: h_i is taken from the layer itself
        torch.testing.assert_close(out.hidden_states[-1], hf.model.norm(h), rtol=1e-12, atol=1e-12)
        e = rms(hf.model.embed_tokens(next_ids), w["enorm.weight"], c.rms_norm_eps)
        hn = rms(h, w["hnorm.weight"], c.rms_norm_eps)
        x = torch.cat([e, hn] if order == "eh" else [hn, e], -1) @ w["eh_proj.weight"].T
        block = DeepseekV3DecoderLayer(c, N).double().eval()
        block.load_state_dict({k: v for k, v in w.items() if k.startswith(
            ("input_layernorm", "post_attention_layernorm", "self_attn.", "mlp."))})
        T = ids.shape[1]
        pos = torch.arange(T)[None]
        causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        x = block(x, attention_mask=causal, position_ids=pos, position_embeddings=hf.model.rotary_emb(x, pos))
        return h, rms(x, w["shared_head.norm.weight"], c.rms_norm_eps) @ w["shared_head.head.weight"].T


CASES: dict[str, dict[str, Any]] = {"moe-block": {}, "dense-block": dict(first_k_dense_replace=3),
                                    "own-head": dict(own_head=True)}


@pytest.mark.parametrize("name", list(CASES))
def test_mtp_logits_match_the_report(name: str, tmp_path: Path) -> None:
    overrides = dict(CASES[name])
    own_head = overrides.pop("own_head", False)
    hf = make64({**overrides, "num_nextn_predict_layers": 1})
    w = mtp_tensors(hf, own_head)
    save(hf, tmp_path, w)
    ours = attnzoo.load_model(tmp_path, dtype=torch.float64)
    assert ours.config.num_mtp_layers == 1 and len(ours.mtp) == 1
    mtp = ours.mtp[0]
    assert (mtp.lm_head is not None) == own_head   # a copy equal to lm_head is not kept twice
    assert type(mtp.block.mlp).__name__ == ("SwiGLU" if name == "dense-block" else "DeepseekMoE")
    seq = torch.randint(0, VOCAB, (2, 25), generator=torch.Generator().manual_seed(3))
    ids, next_ids = seq[:, :-1], seq[:, 1:]
    h_ref, ref = oracle(hf, w, ids, next_ids)
    with torch.no_grad():
        logits, h = ours(ids, return_hidden=True)
        mine = mtp(h, next_ids)
    torch.testing.assert_close(logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    scale = ref.abs().max().item()
    assert scale > 0.5 and ref.std().item() > 0.05, f"MTP logits too small to mean anything (max |x| {scale})"
    assert mine.shape == (2, 24, VOCAB)
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4 * scale)
    # the oracle can tell the concatenation order and which hidden state is read
    assert not torch.allclose(oracle(hf, w, ids, next_ids, order="he")[1], ref, rtol=1e-3, atol=1e-3 * scale)
    with torch.no_grad():
        assert not torch.allclose(mtp(ours.norm(h), next_ids), ref, rtol=1e-3, atol=1e-3 * scale)


def test_checkpoints_without_mtp_weights_load_without_mtp(tmp_path: Path, caplog) -> None:
    hf = make_hf({"num_nextn_predict_layers": 0})
    save(hf, tmp_path / "none", {})
    assert attnzoo.load_model(tmp_path / "none").config.num_mtp_layers == 0
    hf = make_hf({"num_nextn_predict_layers": 1})     # declared, weights absent (what save_pretrained writes)
    save(hf, tmp_path / "absent", {})
    with caplog.at_level(logging.INFO, logger="attnzoo.models"):
        model = attnzoo.load_model(tmp_path / "absent")
    assert model.config.num_mtp_layers == 0 and len(model.mtp) == 0
    assert "declares 1 MTP layer(s) but the checkpoint has no model.layers.2" in caplog.text
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_tensor_parallel_load_skips_mtp_layers(tmp_path: Path, caplog) -> None:
    """Each rank's slice rules are per main layer: the MTP layer's tensors are not read (they used to raise)."""
    hf = make64({"num_nextn_predict_layers": 1})
    save(hf, tmp_path, mtp_tensors(hf, own_head=False))
    with caplog.at_level(logging.INFO, logger="attnzoo.models"):
        shards = [sharding.load_hf_shard(tmp_path, ParallelContext(r, 2)) for r in range(2)]
    assert all(s.config.num_mtp_layers == 0 and len(s.mtp) == 0 for s in shards)
    assert "tensor parallelism loads no MTP layers" in caplog.text
