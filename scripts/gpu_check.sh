#!/usr/bin/env bash
# The GPU check in one command, on the device machine (see docs/benchmarks.md, "GPU check").
#
#   scripts/gpu_wheels.sh                       # here, once: wheels the GPU machine lacks -> .gpu_wheels/
#   run(command="scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=420)
#   scripts/gpu_check.sh --smoke                # CPU dry run (tiny shapes, interpret mode; CI runs it)
#
# Installs the carried wheels and this repository offline (GPU mode only), then runs
# scripts/gpu_check.py, which writes gpu_check.{json,md,log} to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ " $* " != *" --smoke "* ]]; then
  t0=$(date +%s)
  if [ -d .gpu_wheels ]; then
    "$PY" -m pip install -q --no-index --find-links .gpu_wheels fastapi uvicorn pydantic gguf openai 2>&1 | tail -3
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3 \
    || { echo "editable install failed: installing the carried jaxserve wheel"; \
         "$PY" -m pip install -q --no-index --no-deps --force-reinstall .gpu_wheels/jaxserve-*.whl; }
  echo "[gpu_check] install: $(( $(date +%s) - t0 ))s"
fi
exec "$PY" scripts/gpu_check.py "$@"
