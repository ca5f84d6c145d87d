"""Build a C++ CPU kernel's sources as of a git revision (benchmarks compare an older kernel with
the working tree's, interleaved in one process): ``bench_cpu_attention.py``'s ``cpu+REV``,
``bench_cpu_gemm.py``'s ``gemm+REV``."""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
COMMON = "pallas_kernels/cpu_common"  # the shared headers (since the kernels include cpu_shared.h)


def _export(rev: str, directory: str, dest: Path) -> None:
    """Write ``directory``'s ``*.cc``/``*.h`` as of ``rev`` into ``dest`` (nothing when it did not exist then)."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{directory}"], cwd=ROOT, capture_output=True,
                             text=True)
    for name in (n for n in listing.stdout.split() if n.endswith((".cc", ".h"))):
        (dest / name).write_text(subprocess.run(["git", "show", f"{rev}:{directory}/{name}"], cwd=ROOT,
                                                capture_output=True, text=True, check=True).stdout)


@functools.cache
def build_revision(kernel_dir: str, rev: str) -> ctypes.CDLL:
    """Compile ``kernel_dir`` (e.g. ``pallas_kernels/cpu_gemm``) as of ``rev``, with that revision's
    shared headers, with the build's flags; returns the loaded library."""
    from jaxserve.pallas_kernels import cpu_ffi_build as build

    d = Path(tempfile.mkdtemp(prefix=f"{Path(kernel_dir).name}_rev_"))
    (d / "common").mkdir()
    _export(rev, kernel_dir, d)
    _export(rev, COMMON, d / "common")
    if not any(p.suffix == ".cc" for p in build.sources(d)):
        raise SystemExit(f"no C++ sources in {kernel_dir} at {rev}")
    log = logging.getLogger(__name__)
    build.FfiLibrary(d / "kernel.cc", {}, f"{kernel_dir} at {rev}", "nothing", log, include=d / "common")._build(
        build.compiler(), d / "kernel.so")  # the build's own command: its flags, include path, every *.cc
    return ctypes.cdll.LoadLibrary(str(d / "kernel.so"))
