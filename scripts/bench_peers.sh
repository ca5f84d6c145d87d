#!/usr/bin/env bash
# Side-by-side CPU benchmark: jaxserve, llama.cpp's server and vLLM's CPU build on the same
# SmolLM2-135M-Instruct, one server at a time on this machine, the same bench_serving.py workloads
# (chat, temperature 0, ignore_eos, one warm-up request each):
#   concurrent16  16 concurrent requests x 64 output tokens
#   concurrent64  64 concurrent requests x 128 output tokens
#   prefix16      16 concurrent x 64 tokens behind one shared 512-word system prompt (prefix-cache hits)
#   single        8 requests one at a time x 64 tokens
# jaxserve's workloads start once its background compiles are done (start-up shows both times),
# and each server's peak memory: the sum of VmHWM (peak RSS) over its process tree, read just
# before it is stopped (vLLM runs its engine core in a child process).
#
# Peers come from ../shared/peers/setup_peers.sh (built into $PEERS_DIR, default /tmp/peers).
# Usage: scripts/bench_peers.sh [out_dir] [jaxserve|llama|vllm ...]
#   WORKLOADS="concurrent16 single" runs a subset; JAXSERVE_ARGS adds flags to jaxserve's command
#   (the shipped configs/smollm2.yaml otherwise decides, e.g. --max-num-seqs); REPEAT=N runs each
#   workload N times in a row on the same server (NAME-W.json, then NAME-W-r2.json ...), so that one
#   of the machine's slow stretches cannot decide a run (scripts/peers_table.py takes the median).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_results/peers-$(date -u +%Y%m%d-%H%M)}; shift || true
WHICH=${*:-jaxserve llama vllm}
WORKLOADS=${WORKLOADS:-concurrent16 concurrent64 prefix16 single}
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

wait_compiled() {  # url timeout_s: jaxserve's --background-compile has compiled every shape
  local deadline=$((SECONDS + $2)) n
  while :; do
    n=$(curl -sf "$1/metrics" | awk '/^jaxserve:compiles_pending/ {s += $2} END {print s + 0}')
    [ "${n%.*}" = 0 ] && return 0
    [ $SECONDS -lt $deadline ] || { echo "compiles still pending after $2 s" >&2; return 1; }
    sleep 1
  done
}

workload_args() {  # workload -> bench_serving.py flags
  case $1 in
    concurrent16) echo "--num-prompts 16 --max-concurrency 16 --random-output-len 64" ;;
    concurrent64) echo "--num-prompts 64 --max-concurrency 64 --random-output-len 128" ;;
    prefix16) echo "--num-prompts 16 --max-concurrency 16 --random-output-len 64 --prefix-repetition-prefix-len 512" ;;
    single) echo "--num-prompts 8 --max-concurrency 1 --random-output-len 64" ;;
    *) echo "unknown workload $1" >&2; return 2 ;;
  esac
}

bench() {  # name port model
  local name=$1 port=$2 model=$3 w r tag
  for w in $WORKLOADS; do
    for r in $(seq 1 "${REPEAT:-1}"); do
      tag=$name-$w; [ "$r" = 1 ] || tag=$tag-r$r
      # shellcheck disable=SC2046
      "$PY" scripts/bench_serving.py --base-url "http://127.0.0.1:$port" --model "$model" --endpoint chat \
        $(workload_args "$w") --temperature 0 --ignore-eos --warmup \
        --no-progress --save-result "$OUT/$tag.json" | tee "$OUT/$tag.txt" || true
    done
  done
}

peak_rss_mib() {  # pid: the sum of VmHWM over the process and its descendants, in MiB
  local pids=("$1") i=0 kb=0 c v
  while [ $i -lt ${#pids[@]} ]; do
    for c in $(ps -o pid= --ppid "${pids[$i]}" 2>/dev/null); do pids+=("$c"); done
    i=$((i + 1))
  done
  for c in "${pids[@]}"; do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$c/status" 2>/dev/null || true)
    kb=$((kb + ${v:-0}))
  done
  echo $((kb / 1024))
}

run() {  # name port model ready_path ready_timeout command...
  local name=$1 port=$2 model=$3 ready=$4 timeout=$5; shift 5
  echo "== $name"
  local t0=$SECONDS
  "$@" >"$OUT/$name-server.log" 2>&1 &
  local pid=$!
  if wait_ready "http://127.0.0.1:$port$ready" "$timeout"; then
    echo "$((SECONDS - t0))" >"$OUT/$name-startup_s.txt"
    # jaxserve is ready before its background compiles end; the workloads start once they have
    if [ "$name" = jaxserve ] && wait_compiled "http://127.0.0.1:$port" "$timeout"; then
      echo "$((SECONDS - t0))" >"$OUT/$name-all_compiled_s.txt"
    fi
    bench "$name" "$port" "$model" || true
    peak_rss_mib "$pid" >"$OUT/$name-peak_rss_mib.txt"
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 2
}

for w in $WHICH; do
  case $w in
    jaxserve) run jaxserve 8000 SmolLM2-135M-Instruct /health 600 \
                "$PY" -m jaxserve.serve --config configs/smollm2.yaml --port 8000 --log-level warning ${JAXSERVE_ARGS:-} ;;
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
print("| server | startup s (all compiled) | peak RSS MiB | workload | output tok/s | TTFT mean ms | TTFT median ms | ITL median ms | TPOT mean ms |")
print("|---|---|---|---|---|---|---|---|---|")
for name in ("jaxserve", "llama.cpp", "vllm-cpu"):
    runs = {w: out / f"{name}-{w}.json" for w in ("concurrent16", "concurrent64", "prefix16", "single")}
    if not any(p.exists() for p in runs.values()):
        continue
    read = lambda f: (out / f).read_text().strip() if (out / f).exists() else "-"
    started = read(f"{name}-startup_s.txt")
    if (out / f"{name}-all_compiled_s.txt").exists():
        started += f" ({read(f'{name}-all_compiled_s.txt')})"
    head = [name, started, read(f"{name}-peak_rss_mib.txt")]
    for w, path in runs.items():
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        bad = f" ({r['failed_requests']} failed)" if r["failed_requests"] else ""
        row = head + [w + bad, f"{r['output_throughput']:.1f}", f"{r['ttft_ms']['mean']:.0f}",
                      f"{r['ttft_ms']['median']:.0f}", f"{r['itl_ms']['median']:.1f}", f"{r['tpot_ms']['mean']:.1f}"]
        print("| " + " | ".join(row) + " |")
PYEOF
