"""ServerLimits, its flags on `attnzoo serve`, and an error path that cannot raise (no server needed)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields

import pytest

from attnzoo import cli
from attnzoo.server.errors import error_body, error_response
from attnzoo.server.limits import ServerLimits
from attnzoo.server.main import KERNEL_CACHE_ENTRIES, add_serve_args, bound_kernel_caches


def serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(list(argv))


def test_defaults_a_public_endpoint_can_live_with():
    lim = ServerLimits()
    assert lim.max_n == 128 and lim.max_logprobs == 20
    # every bound is finite: nothing a request multiplies is left open
    assert all(isinstance(getattr(lim, f.name), int) for f in fields(lim))
    assert lim.max_queued_sequences >= lim.max_n     # a request of the largest n can be queued
    assert ServerLimits.from_args(serve_args()) == lim


def test_flags_reach_the_limits():
    lim = ServerLimits.from_args(serve_args("--max-n", "4", "--max-prompts", "2", "--max-stop", "1",
                                            "--max-stop-chars", "8", "--max-stop-token-ids", "3",
                                            "--max-logprobs", "0", "--max-messages", "5", "--max-content-parts", "6",
                                            "--max-body-bytes", "1000", "--max-queued-sequences", "9"))
    assert lim == ServerLimits(max_n=4, max_prompts=2, max_stop=1, max_stop_chars=8, max_stop_token_ids=3,
                               max_logprobs=0, max_messages=5, max_content_parts=6, max_body_bytes=1000,
                               max_queued_sequences=9)


@pytest.mark.parametrize("argv,fragment", [
    (["--max-n", "0"], "--max-n: must be an integer >= 1, got 0"),
    (["--max-n", "many"], "--max-n: expected an integer >= 1, got 'many'"),
    (["--max-logprobs", "21"], "--max-logprobs: must be an integer in 0..20, got 21"),
    (["--max-logprobs", "-1"], "in 0..20"),
    (["--max-body-bytes", "-5"], "--max-body-bytes"),
    (["--max-queued-sequences", "1e9"], "expected an integer"),
    (["--max-queued-requests", "5"], "unrecognized arguments: --max-queued-requests"),   # replaced: one way
])
def test_bad_flag_values_exit_2_before_loading(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("kw", [{"max_n": 0}, {"max_logprobs": 21}, {"max_body_bytes": 1.5}, {"max_stop": True}])
def test_limits_validate_themselves(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        ServerLimits(**kw)


def test_limits_are_frozen():
    with pytest.raises(AttributeError):
        ServerLimits().max_n = 10**6


@pytest.mark.parametrize("message,param", [("\ud800 bad", "x\udfff"), ("ok", None), ("\x00\U0010ffff" * 5000, "p")])
def test_error_rendering_cannot_raise(message, param):
    r = error_response(400, message, param=param, code="\ud83d")
    body = json.loads(r.body)["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    assert len(body["message"]) <= 2003
    assert r.body.isascii()
    if "\ud800" in message:
        assert body["message"] == "\\ud800 bad" and body["param"] == "x\\udfff"


def test_error_body_types():
    assert error_body(404, "m")["error"]["type"] == "not_found_error"
    assert error_body(405, "m")["error"]["type"] == "invalid_request_error"
    assert error_body(415, "m")["error"]["type"] == "invalid_request_error"
    assert error_body(429, "m")["error"]["type"] == "rate_limit_exceeded"
    assert error_body(500, "m")["error"]["type"] == "server_error"


def test_kernel_caches_are_bounded_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    bound_kernel_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == str(KERNEL_CACHE_ENTRIES)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
