#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, the wheels the GPU machine lacks (it has no network).
#
# The GPU image has Python 3.12, jax 0.11.2 (CUDA), flax, orbax, transformers, tokenizers, torch,
# numpy, httpx, anyio, h11, prometheus-client and pytest, but not the server's web stack, gguf or
# the openai client. This downloads those with their whole dependency closure (manylinux x86-64,
# CPython 3.12, binary wheels only: fastapi 0.165, say, needs opentelemetry-api) plus a wheel of
# jaxserve itself into .gpu_wheels/ (git-ignored), which `run(carry=[".gpu_wheels"])` takes along.
# scripts/gpu_check.sh installs them offline with `--find-links`, so pip takes from them only what
# the image lacks (its numpy, torch, jax stay as they are).
#
#   scripts/gpu_wheels.sh            # -> .gpu_wheels/*.whl (about 25 MiB; the carry limit is 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-python3}
PKGS=(fastapi uvicorn pydantic gguf openai)  # scripts/gpu_check.sh installs the same list
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$DEST" "${PKGS[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" . 2>/dev/null \
  || "$PY" -m pip wheel -q --no-deps -w "$DEST" .
du -sh "$DEST"
ls "$DEST"
