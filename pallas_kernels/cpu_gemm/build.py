"""Compile ``kernel.cc`` at first use and register it as an XLA FFI target for the CPU platform
(the shared machinery: ``pallas_kernels/cpu_ffi_build.py``, which also describes the cache)."""

from __future__ import annotations

import logging
from pathlib import Path

from jaxserve.pallas_kernels.cpu_ffi_build import FfiLibrary

TARGET = "jaxserve_cpu_gemm"
GATED_TARGET = "jaxserve_cpu_gated_gemm"  # silu(x . wg^T) * (x . wu^T), the same library
ADD_TARGET = "jaxserve_cpu_gemm_add"  # r + x . w^T, r aliased to the output, the same library
SOURCE = Path(__file__).with_name("kernel.cc")

_library = FfiLibrary(SOURCE, {TARGET: "JaxserveCpuGemm", GATED_TARGET: "JaxserveCpuGatedGemm",
                                ADD_TARGET: "JaxserveCpuGemmAdd"}, "CPU GEMM kernel",
                      "XLA's dot products", logging.getLogger(__name__))
load = _library.load
reset = _library.reset


def native_bf16() -> bool:
    """Whether the built kernel multiplies with AVX512-BF16 (vdpbf16ps); False when it is not built."""
    lib = _library.library()
    return bool(lib is not None and lib.JaxserveCpuGemmNativeBf16())
