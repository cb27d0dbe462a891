from __future__ import annotations

import pytest
import torch

from attnzoo.engine import GenerationConfig, generate
from attnzoo.engine.simple import sample
from attnzoo.engine.detokenizer import RequestDetokenizer
from attnzoo.models import DecoderLM, ModelConfig


@pytest.fixture(scope="module")
def model() -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=48)
    return DecoderLM(cfg).eval()


def test_greedy_is_argmax_of_full_forward(model):
    prompt = [3, 5, 7, 11]
    out = generate(model, prompt, GenerationConfig(max_tokens=10))
    ids = list(prompt)
    for _ in range(10):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_seeded_sampling_is_reproducible_and_varies(model):
    cfg = lambda seed: GenerationConfig(max_tokens=12, temperature=1.5, seed=seed)  # noqa: E731
    assert generate(model, [1, 2], cfg(7)) == generate(model, [1, 2], cfg(7))
    assert len({tuple(generate(model, [1, 2], cfg(s))) for s in range(5)}) > 1


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits, 1.0, 0.7, g) for _ in range(300)}
    assert seen == {0, 1}


def test_stops_at_stop_token_and_at_context(model):
    first = generate(model, [1, 2, 3], GenerationConfig(max_tokens=5))[0]
    assert generate(model, [1, 2, 3], GenerationConfig(max_tokens=5, stop_token_ids=(first,))) == []
    assert len(generate(model, list(range(40)), GenerationConfig(max_tokens=100))) == 8  # 48-token context


@pytest.mark.parametrize("prompt, cfg, fragment", [
    ([], GenerationConfig(), "empty"),
    ([1] * 48, GenerationConfig(), "context"),
    ([1, 64], GenerationConfig(), "vocabulary"),
    ([1], GenerationConfig(max_tokens=0), "max_tokens"),
    ([1], GenerationConfig(temperature=-0.1), "temperature"),
    ([1], GenerationConfig(top_p=0.0), "top_p"),
])
def test_bad_input(model, prompt, cfg, fragment):
    with pytest.raises(ValueError, match=fragment):
        generate(model, prompt, cfg)


def test_incremental_decoder_holds_back_split_characters():
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

    from attnzoo.models import Tokenizer
    # a byte-level vocabulary with no merges: every UTF-8 byte is its own token
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = HFTok(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    t = Tokenizer(tok, bos_token_id=None, eos_token_ids=[])
    text = "a🙂é"
    ids = t.encode(text)
    assert len(ids) == 1 + 4 + 2
    dec = RequestDetokenizer(t, [])
    deltas = [dec.push(i)[0] for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1:4] == ["", "", ""]  # the emoji appears only when its 4th byte arrives
