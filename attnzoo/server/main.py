"""`attnzoo serve`: start the engine core (its own process: it loads the model), build the app, run
uvicorn in this process."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket

from attnzoo import cli_args
from attnzoo.models import DEFAULT_MODEL
from attnzoo.server.limits import ServerLimits

# torch's oneDNN path (bf16 matmuls on CPU) keeps a kernel per input shape in two LRU caches of 1024
# entries, ~1.5 MB each for SmolLM2: clients choosing their prompt lengths could grow the server by GBs.
# 128 entries keep the shapes of a busy batch hot (no slowdown measured; 1 entry halves the speed).
KERNEL_CACHE_ENTRIES = 128


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Before the first matmul (each cache reads its capacity once); an environment setting wins."""
    for var in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(entries))


def api_process_threads() -> None:
    """The API process does no tensor work (the core does): one torch thread, so that nothing here competes
    with the core's threads for the cores."""
    import sys
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="a known name, a .gguf file or a transformers directory")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1", type=cli_args.host,
                   help="bind address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=cli_args.port, default=8000, help="TCP port in 1..65535 (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("ATTNZOO_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $ATTNZOO_API_KEY, else none)")
    from attnzoo.engine.memory import DEFAULT_KV_CACHE_FRACTION
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--kv-cache-memory", type=cli_args.size, default=None, metavar="SIZE",
                        help=f"KV cache budget: bytes or a size such as 512MiB or 2GB (default: what --max-num-seqs "
                             f"sequences at the context need, at most {DEFAULT_KV_CACHE_FRACTION * 100:g}%% of available "
                             f"memory, at least one sequence)")
    memory.add_argument("--kv-cache-fraction", type=cli_args.fraction, default=None, metavar="F",
                        help="KV cache budget as a fraction in (0, 1] of the memory available at start-up")
    p.add_argument("--max-model-len", type=cli_args.positive_int, default=None, metavar="N",
                   help="cap the context at N tokens (default and maximum: the model's)")
    p.add_argument("--max-num-seqs", type=cli_args.positive_int, default=64, metavar="N",
                   help="most requests in one batch (default 64)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bfloat16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16), else float32")
    cli_args.add_quantization_arg(p)
    cli_args.add_enforce_eager_arg(p)
    cli_args.add_speculative_config_arg(p)
    p.add_argument("--log-level", default="info", type=str.lower,
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--deterministic", action="store_true",
                   help="each request gets the same tokens whatever runs beside it (batch-invariant kernels, CPU, "
                        "softmax-attention models; slower: docs/deterministic.md)")
    p.add_argument("--tensor-parallel-size", type=cli_args.positive_int, default=1, metavar="N",
                   help="split the model over N processes (gloo on the CPU, nccl over N GPUs): each holds 1/N of "
                        "the heads, MLP channels, vocabulary and KV cache; needs a transformers checkpoint "
                        "directory (default 1)")
    from attnzoo.server.reasoning import REASONING_PARSERS
    from attnzoo.server.tool_parsers import TOOL_PARSERS
    p.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                   help="split <think>...</think> reasoning into message.reasoning_content; structured outputs and "
                        "tool grammars apply after it")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                   help="how tool_choice 'auto' reads calls out of the model's output (default: detected from the "
                        "chat template, else hermes)")
    ServerLimits.add_args(p.add_argument_group("request limits (400, 413 or 429 beyond)"))


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind host:port before the model loads, so a taken port or a foreign address fails in a second, not
    after the load; uvicorn then serves on this very socket (no window for another process to take it)."""
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r} is not an address or a name that resolves ({e}); use e.g. 127.0.0.1, "
                         f"0.0.0.0 or ::1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        reason = {errno.EADDRINUSE: "the port is already in use; choose another --port or stop what holds it",
                  errno.EACCES: "permission denied (ports below 1024 need privileges); choose a port >= 1024",
                  errno.EADDRNOTAVAIL: "the address is not one of this machine's; use 127.0.0.1 or 0.0.0.0"}
        raise ValueError(f"cannot listen on {where}: {reason.get(e.errno, e.strerror or str(e))}") from None
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> None:
    limits = ServerLimits.from_args(args)   # before anything slow, so a bad value costs no waiting
    sock = listen_socket(args.host, args.port)  # a port in use is reported before the model loads
    import uvicorn

    from attnzoo.server.app import build_app
    from attnzoo.server.core_messages import EngineConfig
    from attnzoo.server.engine_client import EngineClient

    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bound_kernel_caches()        # in the environment, so the spawned core inherits it
    api_process_threads()
    engine = EngineClient(EngineConfig(args.model, dict(
        dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, kv_cache_fraction=args.kv_cache_fraction,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, deterministic=args.deterministic,
        tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
        enforce_eager=args.enforce_eager or None, speculative_config=args.speculative_config), log_level=level))
    name = args.served_model_name or args.model
    app = build_app(engine, name, model_aliases={args.model}, api_key=args.api_key, limits=limits,
                    reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser)
    host = f"[{args.host}]" if ":" in args.host else args.host
    logging.getLogger("attnzoo.server").info("serving %s on http://%s:%d (chat page at /)", name, host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    with sock:  # uvicorn serves on the socket bound above (and then logs no address of its own)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C is how a server stops; uvicorn has shut down cleanly by now
            pass
        finally:
            engine.close()  # the core (and its tensor-parallel workers) stop with the server
