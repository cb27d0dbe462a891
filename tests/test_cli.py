"""The command line as a newcomer uses it: real subprocesses, the default model."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from attnzoo import cli_args

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


def test_python_dash_m_attnzoo():
    r = subprocess.run([sys.executable, "-m", "attnzoo", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: attnzoo") and "serve" in r.stdout


def test_generate_with_a_shorter_context():
    r = run("generate", "What is the capital of France?", "--max-tokens", "24", "--max-model-len", "512")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "KV cache: 33 pages x 16 tokens" in r.stderr  # one 512-token sequence and a spare page


def test_loading_the_model_does_no_avoidable_start_up_work():
    # building the model on the meta device imported torch._dynamo, ~1.5 s of every start
    code = "import sys; from attnzoo.models import load_model; load_model('smollm2'); print('torch._dynamo' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def in_process(capsys, *args: str) -> tuple[int, str]:
    """main() in this process (no torch import per case): exit status and stderr."""
    from attnzoo.cli import main
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, fragment: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "tensor" not in line]  # the loading bar
    assert len(lines) == 1 and lines[0].startswith("attnzoo: error: "), stderr
    assert fragment in lines[0]


def test_serve_port_out_of_range_as_a_newcomer_types_it():
    r = run("serve", "--port", "99999")
    assert_one_line_error(r.returncode, r.stderr, "--port: must be an integer in 1..65535, got 99999")


@pytest.mark.parametrize("args, fragment", [
    (["generate", "x", "--model", "no-such-model"], "known model"),
    (["generate", "x", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["generate", "x", "--temperature", "nan"], "--temperature: expected a finite number"),
    (["generate", "x", "--top-p", "1.5"], "--top-p: must be a number in (0, 1]"),
    (["generate", "x", "--max-tokens", "0"], "--max-tokens: must be an integer >= 1"),
    (["generate", "x", "--max-tokens", "ten"], "--max-tokens: expected an integer >= 1, got 'ten'"),
    (["generate", "x", "--seed", "-3"], "--seed: must be an integer in 0..18446744073709551615"),
    (["generate", "x", "--dtype", "fp8"], "--dtype: invalid choice"),
    (["generate", "x", "--max-model-len", "0"], "--max-model-len: must be an integer >= 1"),
    (["generate", "x", "--model", __file__], "neither a GGUF file"),
    (["generate"], "required: prompt"),
    (["chat", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["serve", "--port", "0"], "--port: must be an integer in 1..65535, got 0"),
    (["serve", "--port", "http"], "--port: expected an integer in 1..65535"),
    (["serve", "--host", ""], "--host: expected a host name or IP address"),
    (["serve", "--kv-cache-memory", "2XB"], "--kv-cache-memory: expected a size such as 536870912, 512MiB or 2GB"),
    (["serve", "--kv-cache-memory", "0MiB"], "--kv-cache-memory: must be at least 1 byte"),
    (["serve", "--kv-cache-fraction", "0"], "--kv-cache-fraction: must be a number in (0, 1]"),
    (["serve", "--kv-cache-fraction", "1.5"], "--kv-cache-fraction: must be a number in (0, 1]"),
    (["serve", "--kv-cache-memory", "1GiB", "--kv-cache-fraction", "0.5"], "not allowed with argument"),
    (["serve", "--max-model-len", "-5"], "--max-model-len: must be an integer >= 1"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs: must be an integer >= 1"),
    (["serve", "--log-level", "loud"], "--log-level: invalid choice"),
    (["serve", "--host", "no-such-host.invalid"], "is not an address or a name that resolves"),
    (["serve", "--host", "192.0.2.1"], "cannot listen on 192.0.2.1:8000: the address is not one of this machine's"),
])
def test_bad_input_is_one_clear_line(capsys, args, fragment):
    assert_one_line_error(*in_process(capsys, *args), fragment)


def test_a_port_in_use_is_reported_before_the_model_loads(capsys, busy_port):
    # the model name is wrong too: the port is checked first, so the user does not wait for a load
    code, err = in_process(capsys, "serve", "--port", str(busy_port), "--model", "no-such-model")
    assert_one_line_error(code, err, f"cannot listen on 127.0.0.1:{busy_port}: the port is already in use")


def test_max_model_len_longer_than_the_models_is_rejected(capsys):
    code, err = in_process(capsys, "generate", "x", "--max-model-len", "9000")
    assert_one_line_error(code, err, "max_model_len must be an integer in 1..8192 (the model's context), got 9000")


@pytest.mark.parametrize("text, value", [
    ("536870912", 536870912), ("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1.5GiB", 3 << 29), ("64 kib", 64 << 10),
    ("10B", 10),
])
def test_sizes(text, value):
    assert cli_args.size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "1.5", "2 G", "1e9", "12XB", "0.1B"])
def test_bad_sizes(text):
    with pytest.raises(Exception, match="size|at least 1 byte"):
        cli_args.size(text)


def test_a_model_the_engine_core_cannot_load_is_one_clear_line(capsys):
    # the engine core (its own process) loads the model; its ValueError comes back as the same one line
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    code, err = in_process(capsys, "serve", "--port", str(free), "--model", "no-such-model")
    assert_one_line_error(code, err, "no-such-model")
