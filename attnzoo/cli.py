"""attnzoo command line: chat and generate (serve, bench and arena arrive with their issues)."""

from __future__ import annotations

import argparse
import sys
import time

from attnzoo.models import DEFAULT_MODEL, KNOWN_MODELS, IncrementalDecoder, ModelLoadError

EPILOG = f"""examples:
  attnzoo chat                                  talk to the default model ({DEFAULT_MODEL})
  attnzoo generate "Write a haiku about cats"   one answer, streamed
  attnzoo generate --raw "Once upon a time"     plain continuation, no chat template
  attnzoo chat --model path/to/model.gguf       any GGUF file or transformers directory
known model names: {', '.join(KNOWN_MODELS)}"""


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a known name ({', '.join(KNOWN_MODELS)}), a .gguf file or a transformers directory")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible answers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="Attention mechanisms and an inference engine.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chat = sub.add_parser("chat", help="interactive chat; /reset starts over, Ctrl-D leaves")
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="a system prompt (default: the model's own)")
    gen = sub.add_parser("generate", help="generate one answer for a prompt and stream it")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template: plain continuation")
    _sampling_args(gen)
    return parser


def _load(name: str):
    from attnzoo.models import load_model
    model = load_model(name)
    if model.tokenizer is None:
        raise ModelLoadError(f"{name} has no tokenizer attnzoo can build, so it cannot take text")
    return model


def _config(args: argparse.Namespace, model):
    from attnzoo.engine import GenerationConfig
    cfg = GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, stop_token_ids=tuple(model.tokenizer.eos_token_ids))
    cfg.validate()
    return cfg


def _stream(model, prompt_ids: list[int], cfg, out=sys.stdout) -> list[int]:
    """Generate and print text as it comes; returns the generated ids."""
    from attnzoo.engine import stream_generate
    dec = IncrementalDecoder(model.tokenizer)
    t0, first = time.perf_counter(), None
    for tok in stream_generate(model, prompt_ids, cfg):
        first = first or time.perf_counter()
        out.write(dec.push(tok))
        out.flush()
    out.write("\n")
    n = len(dec.ids)
    if n > 1 and first is not None:
        rate = (n - 1) / max(time.perf_counter() - first, 1e-9)
        print(f"[{len(prompt_ids)} prompt tokens, {n} generated, first token {first - t0:.2f} s, "
              f"{rate:.1f} tok/s]", file=sys.stderr)
    return dec.ids


def cmd_generate(args: argparse.Namespace) -> None:
    model = _load(args.model)
    cfg = _config(args, model)
    tok = model.tokenizer
    text = args.prompt if args.raw or not tok.chat_template else \
        tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    _stream(model, tok.encode(text), cfg)


def cmd_chat(args: argparse.Namespace) -> None:
    model = _load(args.model)
    cfg = _config(args, model)
    tok = model.tokenizer
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"attnzoo chat with {model.config.name or args.model}. /reset starts over, Ctrl-D leaves.")
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
            reply = _stream(model, ids, cfg)
        except KeyboardInterrupt:
            print("\n(interrupted)")
            messages.pop()
            continue
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}. Type /reset to start a new conversation.", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": tok.decode(reply)})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from attnzoo.engine import GenerationConfig
        # check sampling options before the model loads, so a typo costs no waiting
        GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p).validate()
        {"chat": cmd_chat, "generate": cmd_generate}[args.command](args)
    except (ModelLoadError, ValueError) as e:  # bad input: one clear sentence, no traceback
        print(f"attnzoo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
