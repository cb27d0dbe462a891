#!/usr/bin/env bash
# The same load generator (bench/serve.py) against attnzoo's server and, when available, llama.cpp's
# Served vs offline (LLM.generate) ratios on the issue-20 workloads: bench/serve_engine.py.
# (llama-cpp-python[server], built from source into its own venv: LLAMA_PY=/path/to/venv/bin/python),
# on the same GGUF, one after the other on this machine. Prompts are words (llama.cpp's server takes
# no token-id prompts); llama.cpp ignores `ignore_eos`, so compare output tok/s, not request counts. Results: bench/results/serve-*.json + a table.
#   bash bench/serve_compare.sh            # attnzoo only
#   LLAMA_PY=/tmp/llamavenv/bin/python bash bench/serve_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench/results; mkdir -p "$OUT"
GGUF=$($PY -c "from attnzoo.models.registry import resolve; print(resolve('smollm2'))")
N=${N:-32}; IN=${IN:-128}; OUTLEN=${OUTLEN:-64}

wait_up() { for _ in $(seq 120); do curl -sf "$1/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }

run_suite() {  # name base_url
  local name=$1 url=$2
  for c in 1 8 32; do
    $PY bench/serve.py --base-url "$url" --num-prompts "$N" --input-len "$IN" --output-len "$OUTLEN" \
      --max-concurrency "$c" --random-prompt text --seed 0 --result-file "$OUT/serve-$name-c$c.json" > "$OUT/serve-$name-c$c.txt"
  done
  $PY bench/serve.py --base-url "$url" --dataset generated-shared-prefix --gsp-num-groups 4 \
    --gsp-prompts-per-group 8 --gsp-system-prompt-len 512 --gsp-question-len 32 --gsp-output-len 32 \
    --max-concurrency 32 --seed 0 --result-file "$OUT/serve-$name-gsp.json" > "$OUT/serve-$name-gsp.txt"
}

trap 'kill ${APID:-} ${LPID:-} 2>/dev/null || true' EXIT
if [ -z "${SKIP_ATTNZOO:-}" ]; then
  $PY -m attnzoo.cli serve --port 8101 --log-level warning & APID=$!
  wait_up http://127.0.0.1:8101
  run_suite attnzoo http://127.0.0.1:8101
  kill $APID; wait $APID 2>/dev/null || true
fi

systems=attnzoo
if [ -n "${LLAMA_PY:-}" ]; then
  "$LLAMA_PY" -m llama_cpp.server --model "$GGUF" --port 8102 --n_ctx 8192 --n_threads 2 --interrupt_requests False >/dev/null 2>&1 & LPID=$!
  wait_up http://127.0.0.1:8102
  run_suite llamacpp http://127.0.0.1:8102
  kill $LPID; wait $LPID 2>/dev/null || true
  systems="attnzoo llamacpp"
fi

$PY - $systems <<'PY'
import json, sys
print(f"| system | run | output tok/s | req/s | mean TTFT ms | p99 TTFT ms | mean TPOT ms | mean ITL ms | mean E2E ms | failed |")
print("|---|---|---|---|---|---|---|---|---|---|")
for s in sys.argv[1:]:
    for run in ("c1", "c8", "c32", "gsp"):
        r = json.load(open(f"bench/results/serve-{s}-{run}.json"))
        print(f"| {s} | {run} | {r['output_throughput']:.1f} | {r['request_throughput']:.2f} | {r['mean_ttft_ms']:.0f} | "
              f"{r['p99_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} | {r['mean_itl_ms']:.1f} | {r['mean_e2el_ms']:.0f} | {r.get('failed', 0)} |")
PY
