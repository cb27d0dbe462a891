"""Reasoning parsers: `split` against hand-written answers, streams cut anywhere against `split`."""

from __future__ import annotations

import random

import pytest

from attnzoo.server.reasoning import REASONING_PARSERS, get_reasoning_parser

INSIDE = ["deepseek_r1", "minimax_m2"]
OUTSIDE = ["qwen3", "glm45", "kimi_k2"]
PIECES = ["<think>", "</think>", "<th", "</thi", "<", "/", "\n", "\n\n", " ", "x", "é", "ink>", "think", "a < b"]


def stream(name: str, pieces: list[str]) -> tuple[str, str]:
    p = get_reasoning_parser(name)()
    got = [p.feed(s) for s in pieces] + [p.finish()]
    return "".join(r for r, _ in got), "".join(c for _, c in got)


def check_streams(name: str, text: str, rng: random.Random) -> None:
    r, c = get_reasoning_parser(name)().split(text)
    want = (r or "", c)
    for i in range(len(text) + 1):
        assert stream(name, [text[:i], text[i:]]) == want, (i, text)
    assert stream(name, list(text)) == want
    for _ in range(3):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 8))))
        assert stream(name, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]) == want


@pytest.mark.parametrize("name", INSIDE + OUTSIDE)
def test_split(name: str) -> None:
    split = get_reasoning_parser(name)().split
    assert split("<think>\nhmm, 2+2\n</think>\n\nIt is 4.\n") == ("\nhmm, 2+2\n", "It is 4.\n")
    assert split("<think>still thinking") == ("still thinking", "")
    assert split("<think></think>Done") == (None, "Done")
    if get_reasoning_parser(name).starts_inside:
        assert split("hmm, 2+2</think>\n\nIt is 4.") == ("hmm, 2+2", "It is 4.")
        assert split("no end at all") == ("no end at all", "")
        assert split("") == (None, "")
    else:
        assert split("It is 4.") == (None, "It is 4.")
        assert split("  <think>x</think>y") == ("x", "y")
        assert split("Not reasoning</think>\n\nat all") == (None, "Not reasoning</think>\n\nat all")


@pytest.mark.parametrize("name", INSIDE + OUTSIDE)
@pytest.mark.parametrize("seed", range(3))
def test_streams_join_to_split(name: str, seed: int) -> None:
    rng = random.Random(seed * 10 + len(name))
    for text in ["<think>\nhmm\n</think>\n\nIt is 4.", "It is < 4 </think> ok", "<think>a</thi", "", "\n\n",
                 " <thin", "<think>x</think>\n\n\n", "<think>x</think>\n\n<think>y</think>"]:
        check_streams(name, text, rng)
    for _ in range(6):
        check_streams(name, "".join(rng.choice(PIECES) for _ in range(rng.randrange(12))), rng)


def test_partial_tags_are_held_and_released() -> None:
    p = get_reasoning_parser("qwen3")()
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>a </th") == ("a ", "")
    assert p.feed("ey") == ("</they", "")
    assert p.feed("</think>\n") == ("", "")
    assert p.feed("\nb") == ("", "b")
    assert p.finish() == ("", "")
    p = get_reasoning_parser("qwen3")()
    assert p.feed("<tx") == ("", "<tx")   # decided: no reasoning


def test_registry() -> None:
    assert set(INSIDE + OUTSIDE) <= set(REASONING_PARSERS)
    assert all(REASONING_PARSERS[n].starts_inside for n in INSIDE)
    assert not any(REASONING_PARSERS[n].starts_inside for n in OUTSIDE)
    with pytest.raises(ValueError, match="deepseek_r1.*qwen3"):
        get_reasoning_parser("nope")
