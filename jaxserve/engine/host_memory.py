"""The host allocator policy of a CPU-only serving process.

XLA:CPU allocates each executable's temporary buffer (tens of MB for a prefill step) on every run
and frees it afterwards. With glibc's defaults such blocks are ``mmap``-ed and unmapped (or come
from per-thread arenas that shrink), so every step touches fresh pages again: a 256-token SmolLM2
prefill step took 21.8k minor page faults and ≈ 10 % of its CPU time in them (docs/benchmarks.md
§15, "Prefill step"). One arena, no ``mmap`` for large blocks and a high trim threshold keep the
freed pages mapped for the next step. glibc reads these per arena when a thread first allocates,
so the policy must be set before jax starts its CPU client's threads. On accelerators the
temporary buffers live on the device, so the host keeps glibc's defaults there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
TRIM_THRESHOLD_BYTES = 1 << 30  # free memory above this at the heap's top is still returned
_ACCELERATOR_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def cpu_only_process() -> bool:
    """Whether jax will run on its CPU backend (``JAX_PLATFORMS`` names cpu first, or no accelerator
    plugin is installed), known before any backend starts."""
    requested = os.environ.get("JAX_PLATFORMS", "").strip()
    if requested:
        return requested.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def keep_freed_host_memory() -> bool:
    """On a CPU-only process with glibc: one malloc arena, no ``mmap``-ed blocks, trimming only
    above ``TRIM_THRESHOLD_BYTES``. Call before jax starts a backend. Returns whether it applied."""
    if not cpu_only_process():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): keep its allocator as is
        return False
    ok = all(mallopt(option, value) == 1 for option, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)))
    logger.debug("host allocator: one arena, no mmap blocks (%s)", "set" if ok else "refused")
    return ok
