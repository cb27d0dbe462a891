"""engine/outputs.py: the one output assembler of the offline `LLM` and the server's API process, against the
text it was fed (the decode of the token stream, cut before the first stop string to complete): stop strings
across token boundaries whatever the sizes of the token deltas, n completions, logprobs that stay aligned
with the token ids, delta_text, finish reasons, metrics, and nothing taken after a completion ended."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings, strategies as st

from attnzoo.engine.detokenizer import RequestDetokenizer
from attnzoo.engine.outputs import OutputAssembler, RequestMetrics, RequestOutput
from attnzoo.engine.sampling import SamplingParams
from tests.engine.test_detokenizer import ALPHABET, expected, tiny_bpe

RUNNING = RequestMetrics(1.0, 2.0, 3.0, None)    # the engine's metrics while the request runs


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe()


def lp(tok_id: int) -> dict[int, float]:
    return {tok_id: -tok_id / 7}


def feed(asm: OutputAssembler, index: int, ids: list[int], sizes: list[int],
         finish: str | None = None) -> tuple[list[RequestOutput], list[bool]]:
    """ids as token deltas of the given sizes (the last takes the rest, with the engine's `finish`); a snapshot
    after each, as the engine core's steps would give."""
    outs, stopped, k = [], [], 0
    for i, size in enumerate([*sizes, len(ids)]):
        last = i == len(sizes) or k + size >= len(ids)
        chunk = ids[k:] if last else ids[k:k + size]
        k += len(chunk)
        stopped.append(asm.add(index, chunk, [lp(t) for t in chunk], finish if last else None))
        outs.append(asm.snapshot(0, RUNNING, 0))
        if last:
            return outs, stopped


def test_a_stop_string_across_tokens_ends_the_completion_and_later_tokens_are_ignored(tok):
    text, stop = "hello world, the stop sequence STOP here.", "sequence STOP"
    ids = tok.encode(text)
    asm = OutputAssembler("r", [1, 2], SamplingParams(stop=[stop], logprobs=0), tok)
    outs, stopped = feed(asm, 0, ids, [1] * len(ids))
    k = stopped.index(True)               # the token that completes the stop string, and nothing before it
    assert stop in tok.decode(ids[:k + 1]) and stop not in tok.decode(ids[:k]) and len(tok.encode(stop)) > 1
    out = outs[k]
    assert out.finished and (out.finish_reason, out.outputs[0].stop_reason) == ("stop", stop)
    assert out.text == "hello world, the stop " and out.token_ids == ids[:k + 1]
    assert out.outputs[0].logprobs == [lp(t) for t in ids[:k + 1]]
    emitted = ""
    for o in outs[:k + 1]:                # delta_text adds up, never showing the start of the stop string
        emitted += o.delta_text
        assert o.text == emitted and not any(emitted.endswith(stop[:j]) for j in range(1, len(stop)))
    # what the core sampled before its abort landed, and its abort, change nothing
    for o in outs[k + 1:]:
        assert (o.text, o.token_ids, o.finish_reason, o.delta_text) == (out.text, out.token_ids, "stop", "")
    assert asm.add(0, ids[:2], [lp(t) for t in ids[:2]], "abort") is False
    assert asm.snapshot(0, RUNNING, 0).outputs == out.outputs


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=40),
       stop=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3),
       sizes=st.lists(st.integers(1, 5), max_size=20))
def test_property_any_token_deltas_give_the_text_cut_at_the_first_stop(tok, text, stop, sizes):
    ids = tok.encode(text)
    asm = OutputAssembler("r", [], SamplingParams(stop=stop, logprobs=0), tok)
    outs, _ = feed(asm, 0, ids, sizes, finish="length")
    out = outs[-1]
    one_by_one = RequestDetokenizer(tok, stop)
    n = next((i + 1 for i, t in enumerate(ids) if one_by_one.push(t)[1]), len(ids))
    assert out.finished and out.text == expected(text, stop) == "".join(o.delta_text for o in outs)
    assert out.token_ids == ids[:n] and out.outputs[0].logprobs == [lp(t) for t in ids[:n]]
    assert (out.finish_reason, out.outputs[0].stop_reason) == \
        (("stop", one_by_one.stop_reason) if one_by_one.stopped else ("length", None))


def test_n_completions_finish_reasons_and_metrics(tok):
    asm = OutputAssembler("r", [5], SamplingParams(n=3, stop=["STOP"]), tok)
    assert asm.add(0, tok.encode("hello world")) is False
    assert asm.add(1, tok.encode("the stop sequence STOP here")) is True
    asm.add(2, tok.encode("hello ST"))         # "ST" held back: it may begin "STOP"
    out = asm.snapshot(3, RUNNING, 1)
    assert not out.finished and out.metrics.finished_time is None
    assert [c.text for c in out.outputs] == ["hello world", "the stop sequence ", "hello "]
    assert out.delta_text == "hello world"     # completion 0's
    assert (out.cached_tokens, out.num_preemptions, out.metrics.first_token_time) == (3, 1, 3.0)
    asm.add(0, tok.encode("!"), finish_reason="length")
    asm.add(2, [], finish_reason="stop", stop_reason=7)      # a stop token id, not part of the output
    out = asm.snapshot(3, RequestMetrics(1.0, 2.0, 3.0, 9.0), 1)
    assert out.finished and out.metrics.finished_time == 9.0    # the engine's
    assert [(c.finish_reason, c.stop_reason) for c in out.outputs] == [("length", None), ("stop", "STOP"), ("stop", 7)]
    assert [c.text for c in out.outputs] == ["hello world!", "the stop sequence ", "hello ST"]   # released
    assert out.delta_text == "!" and all(c.logprobs is None for c in out.outputs)   # not asked for


def test_a_request_ended_by_a_stop_string_gets_its_finished_time_once(tok):
    asm = OutputAssembler("r", [], SamplingParams(stop=["world"]), tok)
    before = time.monotonic()
    asm.add(0, tok.encode("hello world"))
    first = asm.snapshot(0, RUNNING, 0).metrics.finished_time   # before the engine knows: now
    assert before <= first <= time.monotonic()
    asm.add(0, [], finish_reason="abort")
    assert asm.snapshot(0, RequestMetrics(1.0, 2.0, 3.0, 99.0), 0).metrics.finished_time == first


def test_without_a_tokenizer_token_ids_only(tok):
    ids = tok.encode("hello STOP")
    asm = OutputAssembler("r", [], SamplingParams(stop=["STOP"], logprobs=2), None)
    assert asm.add(0, ids, [lp(t) for t in ids], "length") is False    # stop strings are the caller's
    out = asm.snapshot(0, RUNNING, 0)
    assert (out.text, out.delta_text, out.token_ids, out.finish_reason) == ("", "", ids, "length")
    assert out.outputs[0].logprobs == [lp(t) for t in ids]
