"""The command line as a newcomer uses it: real subprocesses, the default model."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "attnzoo.cli"]


def run(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), input=stdin, capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    assert "chat" in r.stdout and "generate" in r.stdout and "smollm2" in r.stdout


def test_generate_answers_paris():
    r = run("generate", "What is the capital of France?", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr


def test_chat_keeps_conversation_and_resets():
    r = run("chat", "--max-tokens", "24", stdin="What is the capital of France?\n/reset\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "(conversation cleared)" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    (["generate", "x", "--model", "no-such-model"], "known model"),
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--top-p", "1.5"], "top_p"),
    (["generate", "x", "--max-tokens", "0"], "max_tokens"),
    (["generate", "x", "--model", __file__], "neither a GGUF file"),
])
def test_bad_input_is_one_clear_line(args, fragment):
    r = run(*args)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr
