"""Compile ``kernel.cc`` at first use and register it as an XLA FFI target for the CPU platform.

The shared object is cached per user (``$JAXSERVE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/jaxserve/
kernels``, else ``~/.cache/jaxserve/kernels``) under a key of the source, the compiler's version,
jaxlib's version, the flags and the host CPU's features (``-march=native`` code is the host's).
Each build goes to a temporary file renamed into place, so concurrent processes may build at
once. ``load()`` is thread-safe (background compiles trace in threads) and never raises: when no
compiler is found or the build fails it logs one warning and returns False, and callers fall back.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger(__name__)

TARGET = "jaxserve_cpu_ragged_paged_attention"
SOURCE = Path(__file__).with_name("kernel.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried; "lib": the loaded library
_registered: set[str] = set()  # FFI targets registered in this process (XLA keeps them for good)


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("JAXSERVE_KERNEL_CACHE"):
        return Path(os.environ["JAXSERVE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxserve" / "kernels"


def compiler() -> str | None:
    """``$CXX``, else the first of c++ / g++ / clang++ on PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cpu_features() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), text[:4096])
    except OSError:
        return platform.processor() or platform.machine()


def library_path(cxx: str) -> Path:
    """The cached shared object's path for this source, compiler, jaxlib and host."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), jaxlib.__version__.encode(), " ".join(FLAGS).encode(),
                 _cpu_features().encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"cpu_ragged_paged_attention-{h.hexdigest()[:20]}.so"


def _build(cxx: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.stem + ".", suffix=".so.tmp", dir=dest.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if run.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    path = library_path(cxx)
    if not path.exists():
        log.info("building the CPU attention kernel with %s into %s", cxx, path)
        _build(cxx, path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    if TARGET not in _registered:
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxserveCpuRaggedPagedAttention), platform="cpu")
        _registered.add(TARGET)
    return lib


def load() -> bool:
    """Build (once per cache key), load and register the kernel; False (and one warning) when it cannot."""
    with _lock:
        if "ok" not in _state:
            try:
                _state["lib"] = _load()
                _state["ok"] = True
            except Exception as e:  # noqa: BLE001 -- any build/load failure means: use the XLA path
                log.warning("CPU attention kernel unavailable, using XLA's attention instead: %s", e)
                _state["ok"] = False
        return bool(_state["ok"])


def reset() -> None:
    """Forget the last ``load()`` outcome (tests: make the next call build or fail again)."""
    with _lock:
        _state.clear()
