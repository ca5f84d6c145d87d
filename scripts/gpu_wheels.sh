#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, the wheels the GPU machine lacks (it has no network).
#
# The GPU image has Python 3.12, jax 0.11.2 (CUDA), flax, orbax, transformers, tokenizers, torch,
# numpy, httpx, anyio, h11, prometheus-client and pytest, but not the server's web stack, gguf or
# the openai client. This downloads those (manylinux x86-64, CPython 3.12, binary wheels only, no
# dependencies beyond the list) plus a wheel of jaxserve itself into .gpu_wheels/ (git-ignored),
# which `run(carry=[".gpu_wheels"])` takes along; scripts/gpu_check.sh installs them offline.
#
#   scripts/gpu_wheels.sh            # -> .gpu_wheels/*.whl (a few MiB; the carry limit is 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-python3}
PKGS=(
  fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection
  gguf openai jiter distro sniffio
)
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$DEST" "${PKGS[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" . 2>/dev/null \
  || "$PY" -m pip wheel -q --no-deps -w "$DEST" .
du -sh "$DEST"
ls "$DEST"
