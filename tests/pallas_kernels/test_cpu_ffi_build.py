"""The shared C++ kernel build (``pallas_kernels/cpu_ffi_build.py``): its cache key covers every
source of the kernel's directory (headers too) and nothing outside it, and every ``*.cc`` is compiled."""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import pytest

from jaxserve.pallas_kernels import cpu_ffi_build
from jaxserve.pallas_kernels.cpu_ffi_build import FfiLibrary
from jaxserve.pallas_kernels.cpu_gemm import build as gemm_build
from jaxserve.pallas_kernels.cpu_ragged_paged_attention import build as attention_build

CXX = sys.executable  # library_path only asks the compiler for its version


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    """A kernel directory (kernel.cc, part.cc, part.h) beside an unrelated one (other/); returns kernel.cc."""
    d = tmp_path / "kern"
    d.mkdir()
    (d / "part.h").write_text("#pragma once\ninline int twice(int x) { return 2 * x; }\nint part(int x);\n")
    (d / "part.cc").write_text('#include "part.h"\nint part(int x) { return twice(x) + 1; }\n')
    (d / "kernel.cc").write_text('#include "part.h"\nextern "C" int entry(int x) { return part(x) * 10; }\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "unrelated.h").write_text("int unrelated;\n")
    (tmp_path / "notes.h").write_text("int notes;\n")
    return d / "kernel.cc"


def _key(source: Path) -> Path:
    return FfiLibrary(source, {}, "test kernel", "nothing", logging.getLogger(__name__)).library_path(CXX)


def test_editing_a_header_changes_the_build_key(kernel):
    before = _key(kernel)
    assert _key(kernel) == before  # deterministic
    (kernel.parent / "part.h").write_text("#pragma once\ninline int twice(int x) { return x + x; }\nint part(int x);\n")
    assert _key(kernel) != before


def test_adding_a_header_beside_the_kernel_changes_the_build_key(kernel):
    before = _key(kernel)
    (kernel.parent / "extra.h").write_text("#pragma once\n")
    assert _key(kernel) != before


def test_editing_files_outside_the_kernel_directory_keeps_the_build_key(kernel):
    before = _key(kernel)
    (kernel.parent.parent / "other" / "unrelated.h").write_text("int unrelated = 1;\n")
    (kernel.parent.parent / "notes.h").write_text("int notes = 1;\n")
    (kernel.parent / "README.md").write_text("not a source\n")
    assert _key(kernel) == before


def test_every_cc_of_the_directory_is_compiled_into_the_library(kernel, tmp_path):
    cxx = cpu_ffi_build.compiler()
    assert cxx is not None
    dest = tmp_path / "out" / "kern.so"
    FfiLibrary(kernel, {}, "test kernel", "nothing", logging.getLogger(__name__))._build(cxx, dest)
    assert ctypes.cdll.LoadLibrary(str(dest)).entry(4) == 90  # kernel.cc calls part.cc's part()


def test_the_shipped_kernels_hash_their_headers():
    attention = [p.name for p in cpu_ffi_build.sources(attention_build.SOURCE.parent)]
    assert attention == ["common.h", "decode.h", "kernel.cc", "prefill.h"]
    assert [p.name for p in cpu_ffi_build.sources(gemm_build.SOURCE.parent)] == ["kernel.cc"]
