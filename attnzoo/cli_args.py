"""argparse pieces shared by the command line: one way to check a port, a size, a count, a fraction or a
speculative-decoding config.

Each type raises ArgumentTypeError saying what was wrong and what is allowed; `ArgumentParser` prints
any parse error as one line, `attnzoo: error: argument --port: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from attnzoo.engine.speculative import SpeculativeConfig


class ArgumentParser(argparse.ArgumentParser):
    """Parse errors as one line and exit status 2, like every other bad-input error of the CLI (argparse's
    own prints the usage block first). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        print(f"attnzoo: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def bounded_int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in lo..hi (no upper bound when hi is None)."""
    allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {allowed}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}, got {value}")
        return value

    parse.__name__ = f"integer {allowed}"
    return parse


positive_int = bounded_int(1)
port = bounded_int(1, 65535)
seed = bounded_int(0, 2**64 - 1)  # what torch.Generator.manual_seed takes


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def size(text: str) -> int:
    """Bytes: an integer, or a number with a unit (512MiB, 2GB, 1.5GiB; kB/MB/GB/TB are powers of 1000,
    KiB/MiB/GiB/TiB powers of 1024, case ignored)."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else None
    if unit not in UNITS or (UNITS[unit] == 1 and not m.group(1).isdigit()):  # no fractions of a byte
        raise argparse.ArgumentTypeError(f"expected a size such as 536870912, 512MiB or 2GB (units B, kB, MB, GB, "
                                         f"TB, KiB, MiB, GiB, TiB), got {text!r}")
    value = int(float(m.group(1)) * UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def host(text: str) -> str:
    """A host name or address to bind; whether it can be bound is checked by binding it."""
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expected a host name or IP address such as 127.0.0.1 or 0.0.0.0, "
                                         f"got {text!r}")
    return text


def add_enforce_eager_arg(p: argparse.ArgumentParser) -> None:
    """--enforce-eager, shared by chat, generate and serve."""
    p.add_argument("--enforce-eager", action="store_true",
                   help="never hand decode steps to the compiled graph (by default chat and serve compile it in the "
                        "background once a session has decoded a while, and it takes over when ready; generate, a "
                        "one-shot command, is always eager; docs/engine.md)")


def add_quantization_arg(p: argparse.ArgumentParser) -> None:
    """--quantization, shared by chat, generate and serve."""
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8", "gguf"],
                   help="weight-only quantised linears (CPU): auto (default) = keep a GGUF file's 4-bit weights as "
                        "int4 when one sequence runs at a time (chat, generate; serve --max-num-seqs 1), float "
                        "weights for batches; int4/int8 quantise any model; gguf = a GGUF file's blocks as "
                        "shipped through attnzoo's C++ kernel (llama.cpp's scheme); none = float weights")


def speculative_config(text: str) -> SpeculativeConfig:
    """--speculative-config: vLLM's JSON, checked here (engine/speculative.py) so a bad one costs no load."""
    from attnzoo.engine.speculative import SpeculativeConfig
    try:
        return SpeculativeConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_speculative_config_arg(p: argparse.ArgumentParser) -> None:
    """--speculative-config, shared by chat, generate and serve."""
    p.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys as JSON, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4}\' (methods: ngram, or draft_model with "model": a smaller model '
                        'with the same vocabulary); the output distribution stays the model\'s')
