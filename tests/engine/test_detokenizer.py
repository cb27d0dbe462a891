from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from attnzoo.engine.detokenizer import RequestDetokenizer
from attnzoo.models import Tokenizer

CORPUS = ["hello world, the stop sequence STOP here. Hello there! ### end of text"] * 20


def tiny_bpe() -> Tokenizer:
    """A tiny byte-level BPE: multi-char merges (so stop strings span or split tokens) and raw bytes for
    anything else (so emoji are split across tokens). Also tests/engine/test_outputs.py's."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|eos|>"],
        show_progress=False))
    return Tokenizer(hf, bos_token_id=None, eos_token_ids=[hf.token_to_id("<|eos|>")])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_bpe()


def run(tok: Tokenizer, text: str, stop: list[str], flush: bool = True) -> tuple[list[str], RequestDetokenizer]:
    d = RequestDetokenizer(tok, stop)
    deltas = []
    for t in tok.encode(text):
        delta, stopped = d.push(t)
        deltas.append(delta)
        assert "\ufffd" not in delta
        if stopped:
            break
    if flush and not d.stopped:
        deltas.append(d.flush())
    return deltas, d


def expected(text: str, stop: list[str]) -> str:
    # the stop string that completes first wins; ties go to the one that starts first
    hits = [(i + len(s), i) for s in stop if (i := text.find(s)) >= 0]
    return text[:min(hits)[1]] if hits else text


def test_no_stop_roundtrips_and_skips_special(tok):
    deltas, d = run(tok, "hello 😀 world<|eos|> end", [])
    assert "".join(deltas) == d.text == "hello 😀 world end"


def test_stop_spanning_tokens_never_leaks_a_prefix(tok):
    text, stop = "hello world, the stop sequence STOP here.", ["sequence STOP"]
    assert len(tok.encode(stop[0])) > 1
    deltas, d = run(tok, text, stop)
    assert d.stopped and d.stop_reason == stop[0]
    assert "".join(deltas) == d.text == "hello world, the stop "
    emitted = ""
    for delta in deltas:  # no emitted prefix ever ends in the start of the stop string
        emitted += delta
        assert not any(emitted.endswith(stop[0][:k]) for k in range(1, len(stop[0])))


def test_stop_at_first_token(tok):
    deltas, d = run(tok, "hello world", ["hello"])
    assert deltas == [""] and d.stopped and d.text == ""


def test_earliest_of_several_stops_wins(tok):
    deltas, d = run(tok, "hello world, the stop sequence STOP here.", ["STOP", "the", "here"])
    assert d.stop_reason == "the" and "".join(deltas) == d.text == "hello world, "


def test_held_prefix_released_when_it_cannot_complete(tok):
    d = RequestDetokenizer(tok, ["wor!"])
    out = [d.push(t)[0] for t in tok.encode("hello wor")]
    assert "".join(out) == "hello "  # "wor" held back
    out2 = [d.push(t)[0] for t in tok.encode("ld")]
    assert "".join(out2) == "world" and not d.stopped and d.text == "hello world"


def test_flush_releases_held_text(tok):
    deltas, d = run(tok, "hello STO", ["STOP"], flush=False)
    assert "".join(deltas) == "hello "
    assert d.flush() == "STO" and d.text == "hello STO"


def test_emoji_split_across_tokens(tok):
    text = "a😀b🎉"
    ids = tok.encode(text)
    assert len(ids) > 4
    d = RequestDetokenizer(tok, [])
    deltas = [d.push(t)[0] for t in ids]
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == text and d.flush() == ""


def test_incomplete_char_at_end_is_dropped(tok):
    ids = tok.encode("ok😀")[:-1]
    d = RequestDetokenizer(tok, [])
    assert "".join(d.push(t)[0] for t in ids) + d.flush() == "ok"


def test_prompt_context_does_not_leak_into_output(tok):
    d = RequestDetokenizer(tok, ["!"], prompt_ids=tok.encode("Hello there, "))
    out = "".join(d.push(t)[0] for t in tok.encode("hello world! more"))
    assert out == d.text == "hello world" and d.stopped


def test_push_after_stop_is_ignored(tok):
    _, d = run(tok, "hello STOP", ["STOP"])
    assert d.push(tok.encode("x")[0]) == ("", True) and d.flush() == "" and d.text == "hello "


ALPHABET = "ab ST.😀é\n"


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40),
       stop=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3))
def test_property_deltas_equal_truncated_text(tok, text, stop):
    want = expected(text, stop)
    d = RequestDetokenizer(tok, stop)
    emitted = ""
    for t in tok.encode(text):
        delta, stopped = d.push(t)
        emitted += delta
        assert "\ufffd" not in delta and want.startswith(emitted)  # every step is a safe prefix
        if stopped:
            break
    emitted += d.flush()
    assert emitted == d.text == want
