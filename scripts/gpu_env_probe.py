"""Prints one JSON line describing the machine: Python, jax/jaxlib/flax/transformers/torch versions,
jax's devices and their memory, and ``nvidia-smi``'s GPU, driver and clocks when there is one."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    import jax

    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    row = {
        "python": platform.python_version(), "machine": platform.machine(), "backend": jax.default_backend(),
        "devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
        "bytes_limit_GiB": round(stats.get("bytes_limit", 0) / 2**30, 2),
        **{d: version(d) for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax",
                                   "transformers", "torch", "triton", "numpy")},
    }
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        row["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        row["nvidia_smi"] = f"unavailable: {e}"
    print(json.dumps(row))


if __name__ == "__main__":
    main()
