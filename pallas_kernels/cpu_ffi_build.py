"""Build a C++ XLA FFI kernel with the host's compiler at first use, cache it, and register its targets.

Shared by the CPU kernels (``cpu_ragged_paged_attention``, ``cpu_gemm``). The shared object is cached
per user (``$JAXSERVE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/jaxserve/kernels``, else
``~/.cache/jaxserve/kernels``) under a key of the sources (every ``*.cc`` and ``*.h`` in the
kernel's directory, then every ``*.h`` of the shared ``cpu_common/`` directory, which is on the
include path; names and contents, in sorted order: editing any header rebuilds), the compiler's
version, jaxlib's version, the flags and the host CPU's features (``-march=native`` code is the
host's). Each build goes to a temporary file renamed into place, so concurrent processes may build
at once. ``load()`` is thread-safe (background compiles trace in threads) and never raises: when no
compiler is found or the build fails it logs one warning and returns False, and callers fall back to XLA.
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

# The shipped kernels build warning-free with these (tests/pallas_kernels/test_cpu_ffi_build.py keeps them so).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra")
COMMON = Path(__file__).with_name("cpu_common")  # headers every kernel may include (cpu_shared.h)
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


def sources(directory: Path) -> list[Path]:
    """The files a kernel's build reads: every ``*.cc`` and ``*.h`` in its directory, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.suffix in (".cc", ".h") and p.is_file())


def shared_headers(include: Path = COMMON) -> list[Path]:
    """The shared include directory's headers (every ``*.h`` in ``include``), sorted by name."""
    return sorted(p for p in include.iterdir() if p.suffix == ".h" and p.is_file())


class FfiLibrary:
    """The C++ sources of one directory (``source``'s) built into a shared object whose handler
    symbols become CPU FFI targets; every ``*.cc`` there is compiled, ``*.h`` are included.

    ``targets`` maps each FFI target name to the handler symbol the source exports
    (``XLA_FFI_DEFINE_HANDLER_SYMBOL``); ``what`` names the kernel and ``fallback`` what replaces it
    in log messages; ``include`` is the shared header directory (on the include path and in the key).
    """

    def __init__(self, source: Path, targets: dict[str, str], what: str, fallback: str, log: logging.Logger,
                 include: Path = COMMON) -> None:
        self.source, self.targets, self.what, self.fallback, self.log = source, targets, what, fallback, log
        self.include = include
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}  # "ok": bool once tried; "lib": the loaded library

    def library_path(self, cxx: str) -> Path:
        """The cached shared object's path for these sources, compiler, jaxlib and host."""
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
        h = hashlib.sha256()
        for src in [*sources(self.source.parent), *shared_headers(self.include)]:
            for part in (src.relative_to(src.parent.parent).as_posix().encode(), src.read_bytes()):
                h.update(part)
                h.update(b"\0")
        for part in (version.encode(), jaxlib.__version__.encode(), " ".join(FLAGS).encode(),
                     _cpu_features().encode(), platform.machine().encode()):
            h.update(part)
            h.update(b"\0")
        return cache_dir() / f"{self.source.parent.name}-{h.hexdigest()[:20]}.so"

    def _build(self, cxx: str, dest: Path) -> str:
        """Compile the directory's ``*.cc`` into ``dest``; returns the compiler's warnings (``""`` when clean).

        XLA's FFI headers are a system include (``-isystem``): their warnings are not ours to fix."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=dest.stem + ".", suffix=".so.tmp", dir=dest.parent)
        os.close(fd)
        try:
            units = [str(p) for p in sources(self.source.parent) if p.suffix == ".cc"]
            cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), f"-I{self.include}", *units, "-o", tmp]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if run.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
            os.replace(tmp, dest)
            return run.stderr
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _load(self) -> ctypes.CDLL:
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        path = self.library_path(cxx)
        if not path.exists():
            self.log.info("building the %s with %s into %s", self.what, cxx, path)
            warnings = self._build(cxx, path)
            if warnings:
                self.log.debug("the %s built with compiler warnings:\n%s", self.what, warnings[-2000:])
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in self.targets.items():
            if target not in _registered:
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _registered.add(target)
        return lib

    def load(self) -> bool:
        """Build (once per cache key), load and register the kernel; False (and one warning) when it cannot."""
        with self._lock:
            if "ok" not in self._state:
                try:
                    self._state["lib"] = self._load()
                    self._state["ok"] = True
                except Exception as e:  # noqa: BLE001 -- any build/load failure means: use the XLA path
                    self.log.warning("%s unavailable, using %s instead: %s", self.what, self.fallback, e)
                    self._state["ok"] = False
            return bool(self._state["ok"])

    def library(self) -> ctypes.CDLL | None:
        """The loaded library (after a successful ``load()``), else None."""
        return self._state.get("lib") if self.load() else None  # type: ignore[return-value]

    def reset(self) -> None:
        """Forget the last ``load()`` outcome (tests: make the next call build or fail again)."""
        with self._lock:
            self._state.clear()
