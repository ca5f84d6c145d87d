#!/usr/bin/env bash
# Token budget x prefill buckets on the 16 concurrent x 64 token chat workload (docs/benchmarks.md §15).
# Each variant is "name:checkout:budget"; rounds run the variants interleaved, one server at a time.
# Usage: scripts/bench_prefill_budgets.sh out_dir rounds variant...
#   e.g. scripts/bench_prefill_budgets.sh bench_results/budgets 3 new:.:256 new:.:512 new:.:1024 pow2:/work/main:1024
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1 ROUNDS=$2; shift 2
BENCH=$PWD/scripts/bench_serving.py PY=$PWD/.venv/bin/python CACHE=${CACHE_DIR:-/tmp/xlacache_budgets}
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
  for v in "$@"; do
    IFS=: read -r name tree budget <<<"$v"
    tag=$name-$budget-r$round
    (cd "$tree" && exec .venv/bin/python -m jaxserve.serve --config configs/smollm2.yaml --port 8797 \
      --max-num-batched-tokens "$budget" --compilation-cache-dir "$CACHE" --log-level info) >"$OUT/$tag.log" 2>&1 &
    pid=$!
    t0=$SECONDS
    until curl -sf -o /dev/null http://127.0.0.1:8797/health; do
      kill -0 $pid 2>/dev/null || { echo "server died: $tag" >&2; break; }
      sleep 1
    done
    echo "$((SECONDS - t0))" >"$OUT/$tag.startup_s"
    for pass in a b; do  # a: the first burst after start-up (steps over 512 tokens are not warmed up)
      "$PY" "$BENCH" --base-url http://127.0.0.1:8797 --model SmolLM2-135M-Instruct --endpoint chat \
        --num-prompts 16 --max-concurrency 16 --random-output-len 64 --temperature 0 --ignore-eos --warmup \
        --no-progress --save-result "$OUT/$tag-$pass.json" >/dev/null || true
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$tag $(uptime | sed 's/.*load/load/')"
  done
done
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
print("| run | output tok/s | TTFT mean ms | TTFT median ms | ITL median ms | startup s | compile line |")
print("|---|---|---|---|---|---|---|")
for j in sorted(out.glob("*.json"), key=lambda p: (p.stem.split("-r")[1], p.stem)):
    r = json.loads(j.read_text())
    stem = j.stem[:-2]
    log = (out / f"{stem}.log").read_text()
    m = re.search(r"compiled (\d+) step shapes \((\d+) executables\) in ([\d.]+)s \((\d+) from", log)
    comp = f"{m[1]} shapes / {m[2]} exe in {m[3]} s ({m[4]} cached)" if m else "-"
    st = (out / f"{stem}.startup_s").read_text().strip()
    print(f"| {j.stem} | {r['output_throughput']:.1f} | {r['ttft_ms']['mean']:.0f} | {r['ttft_ms']['median']:.0f} "
          f"| {r['itl_ms']['median']:.1f} | {st} | {comp} |")
PYEOF
