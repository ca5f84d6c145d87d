"""Compile ``kernel.cc`` at first use and register it as an XLA FFI target for the CPU platform
(the shared machinery: ``pallas_kernels/cpu_ffi_build.py``, which also describes the cache)."""

from __future__ import annotations

import logging
from pathlib import Path

from jaxserve.pallas_kernels.cpu_ffi_build import FfiLibrary

TARGET = "jaxserve_cpu_ragged_paged_attention"
SOURCE = Path(__file__).with_name("kernel.cc")

_library = FfiLibrary(SOURCE, {TARGET: "JaxserveCpuRaggedPagedAttention"}, "CPU attention kernel", "XLA's attention",
                      logging.getLogger(__name__))
load = _library.load
reset = _library.reset
