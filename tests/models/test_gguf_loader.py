"""GGUF -> attnzoo: tiny GGUF files written here the way llama.cpp's converter writes them (tensor names,
metadata keys, Q/K row permutation, quantised blocks), from a tiny random transformers Llama.

F32 must reproduce the source model's logits; the lossy types must reproduce the logits of the source
model whose weights were replaced by the same quantise -> dequantise round trip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM

import attnzoo
from attnzoo.models import ModelLoadError

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, EPS, THETA = 128, 64, 4, 2, 16, 128, 2, 1e-5, 10000.0
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def make_hf(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=256, rms_norm_eps=EPS, initializer_range=0.1,
                      tie_word_embeddings=tied, attn_implementation="eager",
                      rope_parameters={"rope_type": "default", "rope_theta": THETA})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # they init to ones: a norm-weight bug would be invisible
    return model


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, *rest = hf.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{BLOCK[module]}.{kind}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time Q/K row permutation (half-split RoPE pairs -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    """(array to hand GGUFWriter.add_tensor, raw_dtype)."""
    if qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    return quantize(w.astype(np.float32), qtype), qtype


def roundtrip(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What a loader recovers from `w` stored as qtype (quantisation acts row by row, so it commutes
    with the Q/K row permutation: the oracle needs no permutation of its own)."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return dequantize(quantize(w.astype(np.float32), qtype), qtype).astype(np.float32)


def write_gguf(path: Path, model: LlamaForCausalLM, qtype: Q = Q.F32, *, arch: str = "llama",
               override: dict[str, tuple[np.ndarray, Q | None]] | None = None) -> Path:
    """Write `model` as llama.cpp would: 2-D weights in qtype, 1-D norms in F32."""
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    override = override or {}
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied models
        name = gguf_name(hf)
        a = t.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            a = permute(a, HEADS)
        elif name.endswith("attn_k.weight"):
            a = permute(a, KV_HEADS)
        data, raw = override[name] if name in override else (encode(a, qtype) if a.ndim == 2 else (a, None))
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def with_weights_roundtripped(model: LlamaForCausalLM, qtype: Q) -> tuple[LlamaForCausalLM, float]:
    """A copy of `model` whose 2-D weights went through qtype; also the largest weight change."""
    oracle = make_hf(tied=model.config.tie_word_embeddings)
    oracle.load_state_dict(model.state_dict())
    changed = 0.0
    with torch.no_grad():
        for _, p in oracle.named_parameters():
            if p.dim() == 2:
                new = torch.from_numpy(roundtrip(p.numpy(), qtype))
                changed = max(changed, (new - p).abs().max().item())
                p.copy_(new)
    return oracle, changed


def ids(batch: int = 2, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape == (2, 40, VOCAB)
    scale = theirs.abs().max().item()
    assert scale > 0.5 and theirs.std().item() > 0.05, f"logits too small to mean anything (max |x| {scale})"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * max(1.0, scale))


@pytest.fixture(scope="module")
def source() -> LlamaForCausalLM:
    return make_hf()


def test_f32_matches_source_model(source: LlamaForCausalLM, tmp_path: Path) -> None:
    """Exact weights: proves the name mapping and the Q/K un-permutation."""
    model = attnzoo.load_model(write_gguf(tmp_path / "m.gguf", source, Q.F32))
    cfg = model.config
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        ("llama", LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    assert cfg.rms_norm_eps == pytest.approx(EPS) and not cfg.tie_word_embeddings
    x = ids()
    with torch.no_grad():
        assert_logits_match(model(x), source(x).logits)


def test_permutation_is_not_a_no_op(source: LlamaForCausalLM) -> None:
    """Otherwise the F32 test would not prove the un-permutation."""
    q = source.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k = source.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    assert not np.array_equal(permute(q, HEADS), q) and not np.array_equal(permute(k, KV_HEADS), k)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_lossy_types_match_dequantised_oracle(source: LlamaForCausalLM, tmp_path: Path, qtype: Q) -> None:
    oracle, changed = with_weights_roundtripped(source, qtype)
    assert changed > 1e-6, f"{qtype.name} round trip left the weights unchanged: the test would be vacuous"
    model = attnzoo.load_model(write_gguf(tmp_path / "m.gguf", source, qtype))
    x = ids()
    with torch.no_grad():
        theirs = oracle(x).logits
        assert_logits_match(model(x), theirs)
        # and the quantisation is visible at the logits (we are not comparing against the source model)
        assert not torch.allclose(source(x).logits, theirs, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_use_token_embd(tmp_path: Path) -> None:
    hf = make_hf(tied=True)
    model = attnzoo.load_model(write_gguf(tmp_path / "m.gguf", hf, Q.F32))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    x = ids()
    with torch.no_grad():
        assert_logits_match(model(x), hf(x).logits)


# ---- bad input -------------------------------------------------------------------------------------

def one_sentence(e: pytest.ExceptionInfo[ModelLoadError]) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_unsupported_tensor_type_is_named(source: LlamaForCausalLM, tmp_path: Path) -> None:
    from gguf.constants import GGML_QUANT_SIZES
    block, nbytes = GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.random.default_rng(0).integers(0, 256, (HIDDEN, FFN // block * nbytes), dtype=np.uint8)
    with pytest.raises(NotImplementedError):  # the premise: gguf cannot dequantise Q8_1
        dequantize(raw, Q.Q8_1)
    path = write_gguf(tmp_path / "m.gguf", source, override={"blk.1.ffn_down.weight": (raw, Q.Q8_1)})
    with pytest.raises(ModelLoadError) as e:
        attnzoo.load_model(path)
    msg = one_sentence(e)
    assert "Q8_1" in msg and "blk.1.ffn_down.weight" in msg


def test_unsupported_tensor_type_f64(source: LlamaForCausalLM, tmp_path: Path) -> None:
    a = source.model.layers[0].mlp.up_proj.weight.detach().numpy().astype(np.float64)
    path = write_gguf(tmp_path / "m.gguf", source, override={"blk.0.ffn_up.weight": (a, None)})
    with pytest.raises(ModelLoadError, match="F64"):
        attnzoo.load_model(path)


def test_unsupported_architecture_lists_supported(source: LlamaForCausalLM, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        attnzoo.load_model(write_gguf(tmp_path / "m.gguf", source, arch="gpt2"))
    msg = one_sentence(e)
    assert "gpt2" in msg and "llama" in msg and "qwen3" in msg


@pytest.mark.parametrize("cut", [0.5, 0.1, 0.9])
def test_truncated_gguf(source: LlamaForCausalLM, tmp_path: Path, cut: float) -> None:
    path = write_gguf(tmp_path / "m.gguf", source, Q.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelLoadError) as e:
        attnzoo.load_model(path)
    one_sentence(e)


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_with_gguf_magic(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError) as e:
        attnzoo.load_model(path)
    one_sentence(e)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a model\n")
    with pytest.raises(ModelLoadError, match="neither a GGUF file nor"):
        attnzoo.load_model(path)
