"""The packaging config ships every kernel package and its C++ source, the shared headers of
``pallas_kernels/cpu_common`` too (a non-editable install that lacked ``kernel.cc`` or a header would
silently fall back to XLA's own products)."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def uncovered(setuptools: dict, root: Path) -> list[str]:
    """Package directories and non-Python files under the mapped source dirs that a wheel would omit."""
    missing = []
    packages = set(setuptools["packages"])
    data = setuptools.get("package-data", {})
    for name, src in setuptools["package-dir"].items():
        for init in sorted((root / src).rglob("__init__.py")):
            rel = init.parent.relative_to(root / src).parts
            pkg = ".".join((name, *rel))
            if pkg not in packages:
                missing.append(pkg)
            for source in sorted([*init.parent.glob("*.cc"), *init.parent.glob("*.h")]):
                if not any(fnmatch.fnmatch(source.name, pat) for pat in data.get(pkg, [])):
                    missing.append(f"{pkg}:{source.name}")
    return missing


def test_every_kernel_package_and_source_is_packaged() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert uncovered(setuptools, ROOT) == []
    kernels = sorted(p.parent.name for p in (ROOT / "pallas_kernels").glob("*/kernel.cc"))
    assert kernels == ["cpu_gemm", "cpu_ragged_paged_attention"]  # the check saw the real sources
    assert [p.name for p in (ROOT / "pallas_kernels" / "cpu_common").glob("*.h")] == ["cpu_shared.h"]


def test_check_detects_a_missing_package_and_source() -> None:
    """Twin: the previous config (no cpu_gemm package, no ``*.cc`` package-data) is caught."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    setuptools["packages"] = [p for p in setuptools["packages"] if p != "jaxserve.pallas_kernels.cpu_gemm"]
    setuptools["package-data"] = {"jaxserve.configs": ["*.yaml", "*.jinja"]}
    missing = uncovered(setuptools, ROOT)
    assert "jaxserve.pallas_kernels.cpu_gemm" in missing
    assert "jaxserve.pallas_kernels.cpu_gemm:kernel.cc" in missing
    assert "jaxserve.pallas_kernels.cpu_ragged_paged_attention:kernel.cc" in missing
    assert "jaxserve.pallas_kernels.cpu_ragged_paged_attention:decode.h" in missing


def test_check_detects_a_missing_shared_header() -> None:
    """Twin: without ``cpu_common``'s package or its ``*.h`` package-data the shared header is caught."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = dict(setuptools["package-data"])
    del data["jaxserve.pallas_kernels.cpu_common"]
    assert uncovered({**setuptools, "package-data": data}, ROOT) == ["jaxserve.pallas_kernels.cpu_common:cpu_shared.h"]
    packages = [p for p in setuptools["packages"] if p != "jaxserve.pallas_kernels.cpu_common"]
    assert uncovered({**setuptools, "packages": packages}, ROOT) == ["jaxserve.pallas_kernels.cpu_common"]
