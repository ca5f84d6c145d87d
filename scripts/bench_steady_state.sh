#!/usr/bin/env bash
# A long-running server's steady state: one jaxserve server (the shipped configs/smollm2.yaml plus
# JAXSERVE_ARGS), BURSTS back-to-back bursts of one bench_serving.py workload (default 64 concurrent
# chat x 128 tokens, temperature 0, ignore_eos), each burst's output tok/s and ITL median printed.
# A fresh server serves its first bursts from never-used KV pages; once they have been handed out
# (about 5,800 pages: eight 64 x 128 bursts) every burst runs on recycled pages, which is where the
# block placement (jaxserve/engine/block_placement.py) matters.
# Usage: scripts/bench_steady_state.sh [out_dir]   (BURSTS=16 PORT=8012 WORKLOAD_ARGS=... PYTHON=...)
set -euo pipefail
OUT=${1:-bench_results/steady}
BURSTS=${BURSTS:-16}
PORT=${PORT:-8012}
PY=${PYTHON:-.venv/bin/python}
WORKLOAD_ARGS=${WORKLOAD_ARGS:---num-prompts 64 --max-concurrency 64 --random-output-len 128}
mkdir -p "$OUT"
# shellcheck disable=SC2086
"$PY" -m jaxserve.serve --config configs/smollm2.yaml --port "$PORT" ${JAXSERVE_ARGS:-} > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
deadline=$((SECONDS + 300))
until [ "$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^jaxserve:compiles_pending/ {s += $2; f = 1} END {print f ? s + 0 : -1}')" = 0 ]; do
  [ $SECONDS -lt $deadline ] || { echo "server not ready and compiled after 300 s" >&2; exit 1; }
  sleep 1
done
for b in $(seq 1 "$BURSTS"); do
  # shellcheck disable=SC2086
  "$PY" scripts/bench_serving.py --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct --endpoint chat \
    $WORKLOAD_ARGS --temperature 0 --ignore-eos --seed "$b" --no-progress --save-result "$OUT/burst-$b.json" > /dev/null
  "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print(f\"burst {sys.argv[2]}: {d['output_throughput']:.1f} tok/s, ITL median {d['itl_ms']['median']:.1f} ms\")" "$OUT/burst-$b.json" "$b"
done
