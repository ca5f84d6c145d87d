"""The CPU host allocator policy (``engine/host_memory.py``): an executable's large buffers are
reused from one run to the next instead of being mapped afresh (page faults on every run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxserve.engine.host_memory import cpu_only_process

# Mallocs, touches and frees a 64 MiB block (an executable's temporary buffer) and prints the
# minor page faults per round once warm: with glibc's defaults a block that large is mmap-ed and
# unmapped each time (every page faulted in again); with the policy it is reused from the heap.
_PROBE = """
import ctypes, ctypes.util, json, resource, sys
if sys.argv[1] == "keep":
    from jaxserve.engine.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def round_trip():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
for _ in range(3):
    round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_trip()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
"""


def _faults_per_call(mode: str) -> float:
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_policy_reuses_a_freed_temporary_buffer_where_defaults_fault_it_in_again() -> None:
    defaults, keep = _faults_per_call("defaults"), _faults_per_call("keep")
    assert defaults >= 16, defaults  # the twin: glibc's defaults fault the buffer in on every call
    assert keep * 10 < defaults and keep < 8, (keep, defaults)


def test_cpu_only_process_follows_jax_platforms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_only_process()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not cpu_only_process()
