"""The default model end to end: attnzoo vs transformers loading the same GGUF (fp32)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.engine import GenerationConfig, generate
from attnzoo.models.registry import resolve
from attnzoo.ops.batch_invariant import batch_invariant

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "List three colours:\n1.",
    "Water boils at 100 degrees Celsius because",
]


@pytest.fixture(scope="module")
def ours():
    return attnzoo.load_model("smollm2")


@pytest.fixture(scope="module")
def theirs():
    transformers = pytest.importorskip("transformers")
    path = resolve("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def test_config_read_from_gguf(ours):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.max_position_embeddings == 8192


def test_logits_match_transformers(ours, theirs):
    hf, _ = theirs
    chat = ours.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    for text in PROMPTS[:3] + [chat]:
        ids = torch.tensor([ours.tokenizer.encode(text)])
        with torch.no_grad():
            a, b = ours(ids), hf(ids).logits
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-4, f"{text!r}: relative error {rel:.2e}"


def _batched_and_single(model, ids):
    with torch.no_grad():
        return model(ids), torch.cat([model(ids[i:i + 1]) for i in range(len(ids))])


def test_batched_logits_match_single(ours):
    """Default mode: the batch changes GEMM tiles and so the rounding. Measured on SmolLM2 in fp32 (logits
    span about +-30): up to 4.4e-5 on a 2-core EPYC (AVX-512) and 1.1e-4 on a Xeon with AMX; the bound is
    8x the largest measured."""
    ids = torch.tensor([ours.tokenizer.encode(p)[:5] for p in PROMPTS])
    batched, single = _batched_and_single(ours, ids)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_logits_equal_single_when_batch_invariant(ours, dtype):
    model = ours if dtype == "float32" else attnzoo.load_model("smollm2", dtype=dtype)
    ids = torch.tensor([model.tokenizer.encode(p)[:5] for p in PROMPTS])
    with batch_invariant():
        batched, single = _batched_and_single(model, ids)
    assert torch.equal(batched, single)


def test_greedy_continuations_match_transformers(ours, theirs):
    hf, _ = theirs
    eos = set(ours.tokenizer.eos_token_ids)
    for text in PROMPTS:
        ids = ours.tokenizer.encode(text)
        mine = generate(ours, ids, GenerationConfig(max_tokens=32, stop_token_ids=tuple(eos)))
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        ref = out[0, len(ids):].tolist()
        ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
        assert mine == ref, f"{text!r}: ours {mine} vs transformers {ref}"
        assert len(mine) >= 8  # a continuation that stops at once would prove little


def test_tokenizer_matches_transformers(ours, theirs):
    _, htok = theirs
    texts = ["Hello world!", "  leading spaces and\ttabs\n\nnew lines", "naïve café — 東京 🙂",
             "x = [1, 22, 333]; print(x)", "<|im_start|>user\nhi<|im_end|>\n"]
    for t in texts:
        assert ours.tokenizer.encode(t) == htok(t, add_special_tokens=False).input_ids, t
        ids = ours.tokenizer.encode(t)
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == t
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of Italy?"}]
    assert ours.tokenizer.apply_chat_template(msgs) == htok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


def test_chat_answers_paris(ours):
    tok = ours.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    out = generate(ours, ids, GenerationConfig(max_tokens=24, stop_token_ids=tuple(tok.eos_token_ids)))
    assert "Paris" in tok.decode(out)


def test_prompt_longer_than_context_is_rejected_before_compute(ours):
    with pytest.raises(ValueError, match="context"):
        generate(ours, [1] * 8192, GenerationConfig(max_tokens=4))
    with pytest.raises(ValueError, match="exceed the model's context"):
        ours(torch.ones(1, 8193, dtype=torch.long))
