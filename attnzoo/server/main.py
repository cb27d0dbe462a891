"""`attnzoo serve`: load the model, build the app, run uvicorn."""

from __future__ import annotations

import argparse
import logging
import os

from attnzoo.models import DEFAULT_MODEL


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="a known name, a .gguf file or a transformers directory")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("ATTNZOO_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $ATTNZOO_API_KEY, else none)")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="answer 429 when more requests than this wait to be scheduled (default: unbounded)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes (default: 1/4 of free RAM)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests in one batch (default 64)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bfloat16 on CPUs with native bf16, else float32")
    p.add_argument("--log-level", default="info")


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from attnzoo.engine import LLM
    from attnzoo.server.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs)
    name = args.served_model_name or args.model
    app = build_app(llm, name, model_aliases={args.model}, api_key=args.api_key,
                    max_queued_requests=args.max_queued_requests)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
