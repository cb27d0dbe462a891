"""attnzoo command line: chat, generate, serve, bench and arena."""

from __future__ import annotations

import argparse
import sys
import time

from attnzoo import cli_args
from attnzoo.models import DEFAULT_MODEL, KNOWN_MODELS, ModelLoadError

EPILOG = f"""examples:
  attnzoo chat                                  talk to the default model ({DEFAULT_MODEL})
  attnzoo generate "Write a haiku about cats"   one answer, streamed
  attnzoo generate --raw "Once upon a time"     plain continuation, no chat template
  attnzoo chat --model path/to/model.gguf       any GGUF file or transformers directory
  attnzoo serve --port 8000                     OpenAI-compatible server, chat page at http://127.0.0.1:8000/
  attnzoo bench serve --base-url http://127.0.0.1:8000 --num-prompts 16
  attnzoo arena --mechanisms gqa,gdn            train and compare mechanisms (`attnzoo arena --help`)
  attnzoo chat --model runs/arena/gdn           talk to a model the arena trained
known model names: {', '.join(KNOWN_MODELS)}"""


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a known name ({', '.join(KNOWN_MODELS)}), a .gguf file or a transformers directory")
    p.add_argument("--max-tokens", type=cli_args.positive_int, default=256,
                   help="most tokens to generate per answer (default 256)")
    p.add_argument("--temperature", type=cli_args.non_negative_float, default=0.0,
                   help="0 = greedy (default); higher = more random")
    p.add_argument("--top-p", type=cli_args.fraction, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=cli_args.seed, default=None, help="seed for sampling, for reproducible answers")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights and compute: auto = bfloat16 where the device computes it natively "
                        "(a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16), else float32")
    p.add_argument("--max-model-len", type=cli_args.positive_int, default=None, metavar="N",
                   help="cap the context at N tokens (default: the model's); the KV cache holds one such sequence")
    cli_args.add_quantization_arg(p)
    cli_args.add_enforce_eager_arg(p)
    cli_args.add_speculative_config_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = cli_args.ArgumentParser(prog="attnzoo", description="Attention mechanisms and an inference engine.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chat = sub.add_parser("chat", help="interactive chat; /reset starts over, Ctrl-D leaves")
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="a system prompt (default: the model's own)")
    gen = sub.add_parser("generate", help="generate one answer for a prompt and stream it")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template: plain continuation")
    _sampling_args(gen)
    from attnzoo.server.main import add_serve_args
    add_serve_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page at /"))
    bench = sub.add_parser("bench", help="benchmarks; `attnzoo bench serve --help` for the serving load generator")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for name, text in BENCHES.items():
        bench_sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("arena", help="train every mechanism on the same data and compare them", add_help=False)
    return parser


def _engine(args: argparse.Namespace, one_shot: bool = False):
    """The engine for one interactive stream: one sequence, so the default KV budget is one sequence at the
    context (pages are touched only as the conversation fills them). one_shot (generate): always eager, since
    a compile started by one answer would outlive it (the process would wait for it before exiting)."""
    from attnzoo.engine import LLM
    from attnzoo.models.registry import default_device, load_model
    model = load_model(args.model, dtype=args.dtype, device=default_device(), quantization=args.quantization)
    if model.tokenizer is None:
        raise ModelLoadError(f"{args.model} has no tokenizer attnzoo can build, so it cannot take text")
    eager = True if one_shot else args.enforce_eager or None
    return LLM(model, max_num_seqs=1, max_model_len=args.max_model_len, enforce_eager=eager,
               speculative_config=args.speculative_config)


def _show_engine_log() -> None:
    """chat and generate print the engine's start-up lines (the KV cache it reserved) and its warnings on
    stderr; the answer alone goes to stdout."""
    import logging
    log = logging.getLogger("attnzoo")
    if not log.handlers:
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _params(args: argparse.Namespace):
    from attnzoo.engine import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed)


def _stream(llm, prompt_ids: list[int], params, out=sys.stdout) -> list[int]:
    """Generate through the engine and print text as it comes; returns the generated ids."""
    from dataclasses import replace
    # never ask for more than the context has room for: stop at its end with finish reason "length"
    params = replace(params, max_tokens=max(1, min(params.max_tokens, llm.max_model_len - len(prompt_ids))))
    t0, first, last = time.perf_counter(), None, None
    for snap in llm.stream(prompt_ids, params):
        now = time.perf_counter()
        first = first or now
        out.write(snap.delta_text)
        out.flush()
        last = snap
    out.write("\n")
    ids = last.token_ids if last else []
    if len(ids) > 1 and first is not None:
        rate = (len(ids) - 1) / max(time.perf_counter() - first, 1e-9)
        print(f"[{len(prompt_ids)} prompt tokens, {len(ids)} generated, first token {first - t0:.2f} s, "
              f"{rate:.1f} tok/s]", file=sys.stderr)
    return ids


def cmd_generate(args: argparse.Namespace) -> None:
    llm = _engine(args, one_shot=True)
    tok = llm.tokenizer
    text = args.prompt if args.raw or not tok.chat_template else \
        tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    _stream(llm, tok.encode(text), _params(args))


def cmd_chat(args: argparse.Namespace) -> None:
    llm = _engine(args)
    params, tok = _params(args), llm.tokenizer
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"attnzoo chat with {llm.model.config.name or args.model}. /reset starts over, Ctrl-D leaves.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if not line:
            continue
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(messages))
        try:
            reply = _stream(llm, ids, params)
        except KeyboardInterrupt:  # the stream's cleanup aborts the request and frees its pages
            print("\n(interrupted)")
            messages.pop()
            continue
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}. Type /reset to start a new conversation.", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": tok.decode(reply)})


def cmd_serve(args: argparse.Namespace) -> None:
    from attnzoo.server.main import serve
    serve(args)


BENCHES = {"serve": "load-test an OpenAI-compatible server (vLLM's bench serve)",
           "soak": "the server under streams, hang-ups and fuzzed requests: nothing lost, leaked or changed",
           "throughput": "offline throughput vs transformers' batched generate",
           "prefix_cache": "time to first token with the radix cache on vs off",
           "generate_cpu": "single-stream decode and prefill vs transformers",
           "attention_cpu": "the attention op vs SDPA vs the reference",
           "flash_cpu": "blockwise O(N) attention: time and peak memory vs naive",
           "delta_rule": "gated delta rule: chunked vs recurrent prefill, decode vs softmax",
           "mla": "MLA: KV bytes per token and absorbed vs expanded decode",
           "sparse": "DSA / MSA / NSA select-then-attend vs dense, and the sparse cost model",
           "hybrid": "SWA/global hybrids: KV bytes, sequences that fit, decode speed at 8k",
           "deterministic": "what deterministic (batch-invariant) mode costs, after checking it holds",
           "quant_cpu": "int4/int8 weight-only matmuls vs fp32/bf16 linears, and a quantised model's decode",
           "quant_answers": "the default model's greedy answers with float, int4, int8 weights and llama.cpp",
           "step_overhead": "host time of a decode step on a tiny model: the engine's own work, per phase",
           "speculative": "n-gram speculative decoding: copy and free-writing tok/s with and without drafts",
           "structured": "JSON-schema-constrained decoding: a half-constrained batch, grammar compile and masks",
           "arena_speed": "every arena contestant's training step: checked against the torch forms, then timed",
           "arena_grid": "what the recall grid costs here: each run's step time and the whole grid's wall time",
           "arena_efficiency": "every contestant through the engine: prefill and decode vs context, cache bytes"}


def cmd_bench(name: str, rest: list[str]) -> int:
    """`attnzoo bench NAME ...` runs bench/NAME.py's main with the remaining arguments (each bench
    owns its options and also runs standalone)."""
    import importlib.util
    from pathlib import Path
    if name not in BENCHES:
        raise ValueError(f"unknown bench {name!r}; available: {', '.join(BENCHES)}")
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    path = bench_dir / f"{name}.py"
    if not path.exists():
        raise ValueError(f"{path} not found: `attnzoo bench` needs a source checkout")
    sys.path.insert(0, str(bench_dir))  # benches import their shared helpers (common.py)
    spec = importlib.util.spec_from_file_location(f"attnzoo_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod    # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod.main(rest) or 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["arena"]:  # the arena owns its options
        from attnzoo.arena.cli import main as arena_main
        return arena_main(argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and not argv[1].startswith("-"):
        try:
            return cmd_bench(argv[1], argv[2:])
        except ValueError as e:
            print(f"attnzoo: error: {e}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        try:
            cmd_serve(args)
        except (ModelLoadError, ValueError) as e:
            print(f"attnzoo: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        return 0
    _show_engine_log()
    try:
        _params(args)  # check sampling options before the model loads, so a typo costs no waiting
        {"chat": cmd_chat, "generate": cmd_generate}[args.command](args)
    except (ModelLoadError, ValueError, NotImplementedError) as e:  # bad input (or a model with no decode path,
        # e.g. an arena-trained NSA): one clear sentence, no traceback
        print(f"attnzoo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
