"""The shared C++ kernel build (``pallas_kernels/cpu_ffi_build.py``): its cache key covers every
source of the kernel's directory (headers too) and the shared include directory's headers, and
nothing else; every ``*.cc`` is compiled, with the shared directory on the include path."""

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
    """A kernel directory (kernel.cc, part.cc, part.h) including a shared header (common/shared.h),
    beside an unrelated directory (other/); returns kernel.cc."""
    d = tmp_path / "kern"
    d.mkdir()
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "shared.h").write_text("#pragma once\ninline int plus(int x) { return x + 1; }\n")
    (d / "part.h").write_text("#pragma once\ninline int twice(int x) { return 2 * x; }\nint part(int x);\n")
    (d / "part.cc").write_text('#include "part.h"\n#include "shared.h"\nint part(int x) { return plus(twice(x)); }\n')
    (d / "kernel.cc").write_text('#include "part.h"\nextern "C" int entry(int x) { return part(x) * 10; }\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "unrelated.h").write_text("int unrelated;\n")
    (tmp_path / "notes.h").write_text("int notes;\n")
    return d / "kernel.cc"


def _library(source: Path) -> FfiLibrary:
    return FfiLibrary(source, {}, "test kernel", "nothing", logging.getLogger(__name__), include=source.parent.parent / "common")


def _key(source: Path) -> Path:
    return _library(source).library_path(CXX)


def test_editing_a_header_changes_the_build_key(kernel):
    before = _key(kernel)
    assert _key(kernel) == before  # deterministic
    (kernel.parent / "part.h").write_text("#pragma once\ninline int twice(int x) { return x + x; }\nint part(int x);\n")
    assert _key(kernel) != before


def test_adding_a_header_beside_the_kernel_changes_the_build_key(kernel):
    before = _key(kernel)
    (kernel.parent / "extra.h").write_text("#pragma once\n")
    assert _key(kernel) != before


def test_editing_the_shared_header_changes_the_build_key(kernel):
    """Both kernels include cpu_common/cpu_shared.h: a change there must rebuild them."""
    before = _key(kernel)
    (kernel.parent.parent / "common" / "shared.h").write_text("#pragma once\ninline int plus(int x) { return 1 + x; }\n")
    assert _key(kernel) != before


def test_adding_a_shared_header_changes_the_build_key(kernel):
    before = _key(kernel)
    (kernel.parent.parent / "common" / "more.h").write_text("#pragma once\n")
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
    _library(kernel)._build(cxx, dest)
    assert ctypes.cdll.LoadLibrary(str(dest)).entry(4) == 90  # kernel.cc calls part.cc's part(), which includes shared.h


def test_the_shipped_kernels_hash_their_headers():
    attention = [p.name for p in cpu_ffi_build.sources(attention_build.SOURCE.parent)]
    assert attention == ["common.h", "decode.h", "kernel.cc", "prefill.h"]
    assert [p.name for p in cpu_ffi_build.sources(gemm_build.SOURCE.parent)] == ["kernel.cc"]
    assert [p.name for p in cpu_ffi_build.shared_headers()] == ["cpu_shared.h"]
    for kernel in (attention_build, gemm_build):  # both libraries are keyed by (and include) the real shared directory
        assert kernel._library.include == cpu_ffi_build.COMMON


@pytest.mark.parametrize("shipped", [attention_build, gemm_build], ids=["attention", "gemm"])
def test_the_shipped_kernels_build_without_warnings(shipped, tmp_path):
    cxx = cpu_ffi_build.compiler()
    assert cxx is not None and "-Wall" in cpu_ffi_build.FLAGS and "-Wextra" in cpu_ffi_build.FLAGS
    dest = tmp_path / "shipped.so"
    assert shipped._library._build(cxx, dest) == ""
    assert dest.exists()


def test_a_build_returns_the_compilers_warnings(kernel, tmp_path):
    """The twin of the check above: a sign-compare in a kernel's source comes back from the build."""
    part = kernel.with_name("part.cc")
    part.write_text(part.read_text() + "bool fits(unsigned long n, long m) { return n < m; }\n")
    cxx = cpu_ffi_build.compiler()
    assert cxx is not None
    dest = tmp_path / "out" / "kern.so"
    assert "-Wsign-compare" in _library(kernel)._build(cxx, dest)
    assert ctypes.cdll.LoadLibrary(str(dest)).entry(4) == 90  # warnings do not fail the build
