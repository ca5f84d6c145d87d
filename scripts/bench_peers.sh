#!/usr/bin/env bash
# Side-by-side CPU benchmark: jaxserve, llama.cpp's server and vLLM's CPU build on the same
# SmolLM2-135M-Instruct, one server at a time on this machine, the same bench_serving.py workload:
# 16 concurrent chat requests x 64 output tokens (temperature 0), then a single stream.
#
# Peers come from ../shared/peers/setup_peers.sh (built into $PEERS_DIR, default /tmp/peers).
# Usage: scripts/bench_peers.sh [out_dir] [jaxserve|llama|vllm ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_results/peers-$(date -u +%Y%m%d-%H%M)}; shift || true
WHICH=${*:-jaxserve llama vllm}
PEERS=${PEERS_DIR:-/tmp/peers}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
GGUF=$PEERS/smol/SmolLM2-135M-Instruct.Q4_1.gguf

wait_ready() {  # url timeout_s
  local deadline=$((SECONDS + $2))
  until curl -sf -o /dev/null "$1"; do
    [ $SECONDS -lt $deadline ] || { echo "not ready after $2 s: $1" >&2; return 1; }
    sleep 1
  done
}

bench() {  # name port model
  local name=$1 port=$2 model=$3
  "$PY" scripts/bench_serving.py --base-url "http://127.0.0.1:$port" --model "$model" --endpoint chat \
    --num-prompts 16 --max-concurrency 16 --random-output-len 64 --temperature 0 --ignore-eos --warmup \
    --no-progress --save-result "$OUT/$name-concurrent16.json" | tee "$OUT/$name-concurrent16.txt"
  "$PY" scripts/bench_serving.py --base-url "http://127.0.0.1:$port" --model "$model" --endpoint chat \
    --num-prompts 8 --max-concurrency 1 --random-output-len 64 --temperature 0 --ignore-eos --warmup \
    --no-progress --save-result "$OUT/$name-single.json" | tee "$OUT/$name-single.txt"
}

run() {  # name port model ready_path ready_timeout command...
  local name=$1 port=$2 model=$3 ready=$4 timeout=$5; shift 5
  echo "== $name"
  local t0=$SECONDS
  "$@" >"$OUT/$name-server.log" 2>&1 &
  local pid=$!
  if wait_ready "http://127.0.0.1:$port$ready" "$timeout"; then
    echo "$((SECONDS - t0))" >"$OUT/$name-startup_s.txt"
    bench "$name" "$port" "$model" || true
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 2
}

for w in $WHICH; do
  case $w in
    jaxserve) run jaxserve 8000 SmolLM2-135M-Instruct /health 600 \
                "$PY" -m jaxserve.serve --config configs/smollm2.yaml --port 8000 --log-level warning ;;
    llama) run llama.cpp 8081 smol /v1/models 300 \
             "$PEERS/venv-llama/bin/python" -m llama_cpp.server --model "$GGUF" --host 127.0.0.1 --port 8081 \
             --n_ctx 2048 --n_threads 2 --model_alias smol --interrupt_requests False ;;
    vllm) run vllm-cpu 8082 smol /health 900 env VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 \
            VLLM_CPU_NUM_OF_RESERVED_CPU=0 "$PEERS/venv-vllm/bin/vllm" serve "$PEERS/smol-hf" \
            --served-model-name smol --max-model-len 2048 --host 127.0.0.1 --port 8082 ;;
    *) echo "unknown server $w" >&2; exit 2 ;;
  esac
done

"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| server | startup s | 16 concurrent: output tok/s | TTFT mean ms | single stream: output tok/s | TTFT mean ms | TPOT mean ms |")
print("|---|---|---|---|---|---|---|")
for name in ("jaxserve", "llama.cpp", "vllm-cpu"):
    c, s = out / f"{name}-concurrent16.json", out / f"{name}-single.json"
    if not c.exists():
        continue
    c, s = json.loads(c.read_text()), json.loads(s.read_text()) if s.exists() else None
    st = (out / f"{name}-startup_s.txt").read_text().strip()
    row = [name, st, f"{c['output_throughput']:.1f}", f"{c['ttft_ms']['mean']:.0f}"]
    row += [f"{s['output_throughput']:.1f}", f"{s['ttft_ms']['mean']:.0f}", f"{s['tpot_ms']['mean']:.1f}"] if s else ["-"] * 3
    print("| " + " | ".join(row) + " |")
PYEOF
