"""Structured outputs (JSON-schema-constrained decoding with llguidance) on the default model: what constraining half
of a 32-request batch costs, the grammar engine's compile and per-token mask times beside xgrammar's, and vLLM-CPU's
ratio on the same requests in the same run.

    python bench/structured.py [--max-tokens 80] [--repeats 3] [--quant auto] [--vllm-python PATH] [--quick]

Workload: 32 chat-templated requests at once, temperature 0.7, one seed per request: 16 ask for a JSON object of one
of four schemas (a person, an order with nested items, a weather report with a nested object, a product review:
enums, integer ranges, bounded arrays and strings, additionalProperties false), 16 are free writing. The "mixed" arm
constrains the 16 with their schemas (`StructuredOutputsParams(json=schema)`), the "free" arm runs the same 32
requests without constraints. Throughput: generated tokens / wall s of the whole batch; the arms alternate, each run
`--repeats` times, median (this 2-core machine's speed wanders). Constrained answers end early, so the mixed
batch shrinks sooner than the free one; a third arm ("same lengths") runs the requests unconstrained, each cut at its
mixed-arm length (ignore_eos), so that against it only the constraints differ. A warm-up generate runs first and compiles the four
grammars (the engine caches them per schema); compile time is measured apart. Target: mixed >= 0.9x free.

Correctness before speed: every constrained output must `json.loads` and validate against its schema with
`jsonschema`; an output cut by max_tokens (finish_reason "length") is counted and reported instead.

Grammar engines, on a 50-property schema (strings, integer ranges, enums, booleans, numbers, arrays, a nested object;
all required, additionalProperties false): cold compile (cache cleared, median of 3) with llguidance through
`llm.structured.compile` and with xgrammar (`compile_json_schema`, compact separators), then one valid document of
the schema walked token by token (fill the mask, check the next token is allowed, consume it): mean and p99 us per
mask. llguidance builds its lexer lazily, so "matcher + first mask" is reported beside the compile time for both.
Engine side: `llm.structured.stats` (masks filled and applied per constrained row per step) over the timed mixed runs.

vLLM-CPU (its own venv, /work/peers/vllm-venv by default; bench/structured_vllm.py): the GGUF dequantised to an fp32
transformers directory with its tokenizer, the same token-id prompts, seeds and schemas
(`vllm.sampling_params.StructuredOutputsParams(json=schema, disable_any_whitespace=True)`: compact JSON like
attnzoo's grammars; its default backend), the same two arms.

--quick: 4 requests (2 constrained), up to 64 tokens, one run per arm; no xgrammar, no vLLM: a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jsonschema
import torch
from common import cpu_flags, machine

from attnzoo.engine import LLM, SamplingParams
from attnzoo.engine.structured import StructuredOutputsParams
from attnzoo.models.registry import resolve

BENCH = Path(__file__).resolve().parent
VLLM_PYTHON = "/work/peers/vllm-venv/bin/python"


def obj(**props: dict) -> dict:
    """A closed JSON-schema object: every property required, nothing else allowed."""
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def text(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def integer(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


SCHEMAS = {
    "person": obj(name=text(32), age=integer(0, 120), role=enum("engineer", "designer", "manager", "student"),
                  languages={"type": "array", "items": text(16), "minItems": 1, "maxItems": 3}),
    "order": obj(order_id=integer(1000, 9999), status=enum("pending", "shipped", "delivered", "cancelled"),
                 items={"type": "array", "minItems": 1, "maxItems": 2,
                        "items": obj(product=text(20), quantity=integer(1, 10))},
                 express={"type": "boolean"}),
    "weather": obj(city=text(24), temperature_c=integer(-40, 50),
                   conditions=enum("sunny", "cloudy", "rain", "snow", "storm"),
                   wind=obj(speed_kmh=integer(0, 150), direction=enum("N", "NE", "E", "SE", "S", "SW", "W", "NW"))),
    "review": obj(product=text(24), rating=integer(1, 5), sentiment=enum("positive", "neutral", "negative"),
                  pros={"type": "array", "items": text(24), "maxItems": 2}),
}
TASKS = {
    "person": ["Describe a fictional software engineer who lives in Lisbon.", "Invent a design student from Osaka.",
               "Describe a project manager who speaks three languages.", "Invent a retired engineer who still codes."],
    "order": ["A customer ordered two blue mugs and a teapot, sent express.", "Order 4512: one desk lamp, delivered.",
              "Someone cancelled their order of three notebooks.", "A pending order of five pencils and one eraser."],
    "weather": ["Report a stormy autumn day in Oslo.", "Report a hot summer afternoon in Seville.",
                "Report a snowy morning in Montreal.", "Report a mild cloudy day in Edinburgh."],
    "review": ["Review a pair of running shoes you liked.", "Review a coffee grinder that broke after a week.",
               "Review an average paperback novel.", "Review a pair of noise-cancelling headphones."],
}
FREE = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain to a ten-year-old why the sky is blue.", "Give five ideas for a weekend trip, one sentence each.",
        "Write a haiku about autumn rain.", "Explain how a bicycle gear works.", "Describe your ideal breakfast.",
        "Write a limerick about a cat who learns to code.", "Explain what a compiler does, briefly."]


def requests(n: int) -> tuple[list[str], list[dict | None]]:
    """n prompts: the first n/2 ask for JSON of the four schemas in turn (their schema, else None), the rest free."""
    names = list(SCHEMAS)
    texts, schemas = [], []
    for i in range(n // 2):
        name = names[i % 4]
        texts.append(f"Answer with one JSON object only, following this JSON schema:\n{json.dumps(SCHEMAS[name])}\n\n"
                     f"{TASKS[name][i // 4 % 4]}")
        schemas.append(SCHEMAS[name])
    for i in range(n - n // 2):
        texts.append(f"({i}) {FREE[i % len(FREE)]}")
        schemas.append(None)
    return texts, schemas


def wide_schema(n: int = 50) -> tuple[dict, dict]:
    """A closed n-property schema of mixed kinds and one document valid against it."""
    kinds = [(text(32), "value {i}"), (integer(0, 1000), 13), (enum("low", "medium", "high"), "medium"),
             ({"type": "boolean"}, True), ({"type": "number", "minimum": 0}, 3.25),
             ({"type": "array", "items": text(12), "maxItems": 4}, ["red", "green"]),
             (obj(id=integer(0, 99), label=text(16)), {"id": 7, "label": "tag"})]
    props, doc = {}, {}
    for i in range(n):
        schema, value = kinds[i % len(kinds)]
        key = f"{['name', 'count', 'level', 'active', 'score', 'tags', 'ref'][i % len(kinds)]}_{i}"
        props[key], doc[key] = schema, value.format(i=i) if isinstance(value, str) else value
    schema = obj(**props)
    jsonschema.validate(doc, schema)
    return schema, doc


def chat_ids(llm: LLM, content: str) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": content}]))


def params(schemas: list[dict | None], max_tokens: int, constrained: bool) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=1000 + i,
                           structured_outputs=StructuredOutputsParams(json=s) if constrained and s else None)
            for i, s in enumerate(schemas)]


def check_json(texts: list[str], finish: list[str], schemas: list[dict | None], who: str) -> tuple[int, int]:
    """(valid, cut by length) over the constrained outputs; any other output that is not valid JSON of its schema
    ends the bench."""
    valid = cut = 0
    for i, (t, f, s) in enumerate(zip(texts, finish, schemas)):
        if s is None:
            continue
        if f == "length":
            cut += 1
            continue
        try:
            jsonschema.validate(json.loads(t), s)
        except (ValueError, jsonschema.ValidationError) as e:
            raise SystemExit(f"FAILED: {who}: constrained output {i} ({f}) is not valid JSON of its schema: "
                             f"{str(e).splitlines()[0]}\n{t!r}") from None
        valid += 1
    return valid, cut


def stats(llm: LLM) -> tuple[int, float]:
    s = llm.structured.stats
    return s.mask_rows, s.mask_seconds


def run_arm(llm: LLM, prompts: list[list[int]], ps: list[SamplingParams]) -> tuple[float, float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, ps, use_tqdm=False)
    dt = time.perf_counter() - t0
    llm.check_integrity()
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt, dt, outs


def alternate(run, repeats: int, arms: tuple[str, ...] = ("free", "mixed")) -> dict[str, list]:
    """Run the arms `repeats` times each, the order reversed every other time; {arm: [result, ...]}."""
    got: dict[str, list] = {a: [] for a in arms}
    for r in range(repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            got[arm].append(run(arm))
    return got


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def walk(make, fill, consume, tokens: list[int], mask: torch.Tensor, eos: list[int], who: str
         ) -> tuple[float, list[float]]:
    """(seconds to make the matcher and fill its first mask, seconds per later mask) along `tokens`: fill the mask,
    check the next token is allowed, consume it; the mask after the document must allow EOS."""
    t0 = time.perf_counter()
    m = make()
    made = time.perf_counter() - t0
    times = []
    for t in tokens + [None]:
        t0 = time.perf_counter()
        fill(m)
        times.append(time.perf_counter() - t0)
        if t is not None and not bit(mask, t):
            raise SystemExit(f"FAILED: {who} masks out token {t} of a valid document")
        if t is not None:
            consume(m, t)
    if not any(bit(mask, e) for e in eos):
        raise SystemExit(f"FAILED: {who} does not allow EOS after a complete document")
    return made + times[0], times[1:]


def bit(mask: torch.Tensor, t: int) -> bool:
    return bool((int(mask[0, t // 32]) >> (t % 32)) & 1)


def cold(compile_once, clear, repeats: int):
    """(median seconds of a cold compile, the compiled grammar)."""
    ts = []
    for _ in range(repeats):
        clear()
        t0 = time.perf_counter()
        out = compile_once()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def llguidance_masks(llm: LLM, schema: dict, doc: dict, repeats: int) -> dict:
    import llguidance
    import llguidance.torch as llt
    tok, so = llm.tokenizer, StructuredOutputsParams(json=schema)
    compile_s, grammar = cold(lambda: llm.structured.compile(so), llm.structured.cache_clear, repeats)
    ll_tok = llm.structured.lltok   # the engine's (built once)
    # the engine's grammar decides the separators: compact (xgrammar's here) if it takes them, else json.dumps'
    for form, seps in (("compact", (",", ":")), ("spaced", (", ", ": "))):
        tokens = tok.encode(json.dumps(doc, separators=seps), add_bos=False)
        if llguidance.LLMatcher(ll_tok, grammar).validate_tokens(tokens) == len(tokens):
            break
    else:
        raise SystemExit("FAILED: llguidance rejects a valid document of the 50-property schema")
    mask = llt.allocate_token_bitmask(1, tok.vocab_size)
    first, masks = walk(lambda: llguidance.LLMatcher(ll_tok, grammar),
                        lambda m: llt.fill_next_token_bitmask(m, mask, 0), lambda m, t: m.consume_token(t), tokens,
                        mask, tok.eos_token_ids, "llguidance")
    return {"compile": compile_s, "first": first, "masks": masks, "form": form}


def xgrammar_masks(llm: LLM, schema: dict, doc: dict, repeats: int) -> dict | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    tok, v = llm.tokenizer, llm.tokenizer.vocab_size
    info = xgr.TokenizerInfo([tok.tok.id_to_token(i) or "" for i in range(v)], vocab_type=xgr.VocabType.BYTE_LEVEL,
                             vocab_size=v, stop_token_ids=tok.eos_token_ids)
    compiler = xgr.GrammarCompiler(info, max_threads=torch.get_num_threads())
    compile_s, compiled = cold(lambda: compiler.compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":")), compiler.clear_cache, repeats)
    tokens = tok.encode(json.dumps(doc, separators=(",", ":")), add_bos=False)
    mask = xgr.allocate_token_bitmask(1, v)
    first, masks = walk(lambda: xgr.GrammarMatcher(compiled), lambda m: m.fill_next_token_bitmask(mask, 0),
                        lambda m, t: m.accept_token(t), tokens, mask, tok.eos_token_ids, "xgrammar")
    return {"compile": compile_s, "first": first, "masks": masks, "form": "compact"}


def vllm_dir(gguf: Path, d: str) -> None:
    """The GGUF as an fp32 transformers directory with its tokenizer (vLLM's structured outputs need one);
    transformers keeps a GGUF's weights packed and will not save them, so a plain model of the same config takes
    the float state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    packed = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = packed.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict({k: torch.as_tensor(v).float() for k, v in packed.state_dict().items()})
    plain.save_pretrained(d)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(d)


def run_vllm(python: str, gguf: Path, job: dict) -> dict | str:
    """bench/structured_vllm.py's result, or why there is none (the bench goes on without it)."""
    try:
        with tempfile.TemporaryDirectory() as d:
            vllm_dir(gguf, d)
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(torch.get_num_threads())}
            out = subprocess.run([python, str(BENCH / "structured_vllm.py")], input=json.dumps({**job, "model": d}),
                                 capture_output=True, text=True, env=env, timeout=3600)
    except Exception as e:   # noqa: BLE001 - a peer that does not run is a row saying why, not a failed bench
        return f"vLLM not run: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    lines = [x for x in out.stdout.splitlines() if x.startswith('{"free"')]   # vLLM logs to stdout too
    if out.returncode or not lines:
        tail = [x for x in out.stderr.splitlines() if x.strip()][-1:] or ["no output"]
        return f"vLLM failed (exit {out.returncode}): {tail[0][:300]}"
    return json.loads(lines[-1])


def header() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return (f"# bench/structured.py, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit}\n"
            f"# machine: {machine()}; CPU flags: {cpu_flags()}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each arm (median)")
    ap.add_argument("--quant", default="auto", help="quantization for the engine (auto: float weights for batches)")
    ap.add_argument("--properties", type=int, default=50, help="properties of the compile/mask schema")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON if os.path.exists(VLLM_PYTHON) else None, metavar="PATH",
                    help="python of a venv with vllm: its ratio on the same requests (default: %(default)s)")
    ap.add_argument("--vllm-backend", default="auto", help="vLLM's structured-outputs backend (auto, guidance, ...)")
    ap.add_argument("--vllm-any-whitespace", action="store_true", help="vLLM's default JSON grammar (whitespace "
                    "allowed) instead of compact JSON like attnzoo's")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_requests, args.max_tokens, args.repeats, args.vllm_python = 4, 64, 1, None
    print(header())
    llm = LLM(args.model, max_num_seqs=args.num_requests, enforce_eager=True, quantization=args.quant,
              enable_prefix_caching=False)
    if llm.structured is None:
        raise SystemExit(f"FAILED: {args.model} has no tokenizer: no structured outputs")
    texts, schemas = requests(args.num_requests)
    prompts = [chat_ids(llm, t) for t in texts]
    print(f"# {args.num_requests} requests at once ({sum(s is not None for s in schemas)} with a JSON schema), "
          f"temperature 0.7, seeds 1000+i, up to {args.max_tokens} tokens, EOS ends an answer; engine: quantization "
          f"{args.quant} ({llm.model.embed_tokens.weight.dtype}), eager, prefix cache off; "
          f"median of {args.repeats} alternating runs per arm")

    llm.generate(prompts, params(schemas, 2, True), use_tqdm=False)   # warm-up: every grammar compiled, cached
    mask0 = {"rows": 0, "s": 0.0, "wall": 0.0}

    lengths: list[int] = []   # the mixed arm's answer lengths, for the "same lengths" arm

    def arm(name: str) -> tuple[float, list]:
        rows, secs = stats(llm)
        ps = params(schemas, args.max_tokens, name == "mixed")
        if name == "same lengths":   # free, each request cut at its mixed-arm length: the batch shrinks alike
            ps = [SamplingParams(max_tokens=n, temperature=0.7, seed=p.seed, ignore_eos=True) for p, n in
                  zip(ps, lengths)]
        rate, dt, outs = run_arm(llm, prompts, ps)
        lengths[:] = [len(o.outputs[0].token_ids) for o in outs] if name == "mixed" else lengths
        if name == "mixed":
            rows2, secs2 = stats(llm)
            mask0["rows"] += rows2 - rows
            mask0["s"] += secs2 - secs
            mask0["wall"] += dt
        return rate, outs

    got = alternate(arm, args.repeats, ("free", "mixed", "same lengths"))
    valid = cut = 0
    for _, outs in got["mixed"]:   # correctness before speed: every run's constrained outputs
        v, c = check_json([o.outputs[0].text for o in outs], [o.outputs[0].finish_reason for o in outs], schemas,
                          "attnzoo")
        valid, cut = valid + v, cut + c
    n_json = sum(s is not None for s in schemas)
    free, mixed = (statistics.median(r for r, _ in got[a]) for a in ("free", "mixed"))
    tokens = {a: [len(o.outputs[0].token_ids) for o in got[a][-1][1]] for a in got}
    rows = [("attnzoo (llguidance)", free, mixed, f"{valid}/{n_json * args.repeats}", cut, tokens)]
    same = statistics.median(r for r, _ in got["same lengths"])
    print(f"# attnzoo: free {free:.1f} tok/s, mixed {mixed:.1f} tok/s ({mixed / free:.2f}x)", flush=True)  # vLLM next

    if args.vllm_python:
        job = {"prompts": prompts, "schemas": schemas, "max_tokens": args.max_tokens, "temperature": 0.7,
               "seeds": [p.seed for p in params(schemas, 1, False)], "repeats": args.repeats,
               "backend": args.vllm_backend, "compact": not args.vllm_any_whitespace}
        v = run_vllm(args.vllm_python, resolve(args.model), job)
        if isinstance(v, dict):
            ok, c = check_json(v["texts"], v["finish"], schemas, "vLLM")
            rows.append((f"vLLM-CPU {v['version']} fp32 ({v['backend']} backend; loaded in {v['load']:.0f} s)",
                         v["free"], v["mixed"], f"{ok}/{n_json} (last run)", c, v["tokens"]))
        else:
            rows.append((v, None, None, "", None, None))
    else:
        rows.append(("vLLM-CPU: not run (--quick, or no --vllm-python)", None, None, "", None, None))

    print(f"\n{args.num_requests} concurrent requests: half JSON-schema-constrained (mixed) vs none constrained "
          f"(free)\n")
    print("| system | free tok/s | mixed tok/s | ratio | >= 0.9x | constrained outputs valid | cut by length | "
          "JSON answer tokens mean / max | tokens per request free / mixed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f, m, ok, c, n in rows:
        if f is None:
            print(f"| {name} | | | | | | | | |")
            continue
        js = [t for t, s in zip(n["mixed"], schemas) if s is not None]
        print(f"| {name} | {f:.1f} | {m:.1f} | {m / f:.2f}x | {'yes' if m / f >= 0.9 else 'no'} | {ok} | {c} | "
              f"{statistics.mean(js):.1f} / {max(js)} | {statistics.mean(n['free']):.1f} / "
              f"{statistics.mean(n['mixed']):.1f} |")
    print(f"\nattnzoo, the mixed arm against the same requests unconstrained but each cut at its mixed-arm length "
          f"(ignore_eos: the batch shrinks as in the mixed arm, so only the constraints differ): {same:.1f} tok/s, "
          f"mixed {mixed / same:.2f}x")
    if mask0["rows"]:
        print(f"\nengine masks (timed mixed runs): {mask0['rows']} constrained rows x steps, "
              f"{1e6 * mask0['s'] / mask0['rows']:.0f} us per row per step (fill + apply), "
              f"{100 * mask0['s'] / mask0['wall']:.1f} % of the mixed runs' wall time")

    schema, doc = wide_schema(args.properties)
    repeats = 1 if args.quick else 3
    engines = [("llguidance (llm.structured)", llguidance_masks(llm, schema, doc, repeats))]
    if not args.quick:
        x = xgrammar_masks(llm, schema, doc, repeats)
        engines.append(("xgrammar", x) if x else ("xgrammar: not installed", None))
    print(f"\n{args.properties}-property JSON schema: cold compile (median of {repeats}), then one valid document "
          f"walked token by token (fill the mask, check, consume), {torch.get_num_threads()} threads\n")
    print("| grammar engine | compile ms | matcher + first mask ms | masks | mean us per mask | p99 us per mask | "
          "document separators |")
    print("|---|---|---|---|---|---|---|")
    for name, r in engines:
        if r is None:
            print(f"| {name} | | | | | | |")
            continue
        ms = r["masks"]
        print(f"| {name} | {1e3 * r['compile']:.1f} | {1e3 * r['first']:.1f} | {len(ms)} | "
              f"{1e6 * statistics.mean(ms):.0f} | {1e6 * percentile(ms, 0.99):.0f} | {r['form']} |")


if __name__ == "__main__":
    main()
