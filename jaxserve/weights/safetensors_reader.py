"""Read tensors from an HF checkpoint directory: single or sharded ``*.safetensors``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors import safe_open


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shard files, from ``model.safetensors.index.json`` when present."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint index names missing files: {', '.join(missing)}")
    return files


def count_tensors(files: list[Path]) -> int:
    """How many tensors ``files`` hold (headers only)."""
    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:
            total += len(list(fh.keys()))
    return total


class LazyTensor:
    """A tensor in a safetensors file read only where it is sliced (``t[a:b, c:d]``)."""

    def __init__(self, handle: safe_open, name: str) -> None:
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._slice[index])


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, LazyTensor]]:
    """Yield (HF name, lazily sliced tensor) for every tensor in ``files``.

    All files stay open until the iteration ends, so a tensor can still be sliced after later ones
    were yielded (fused parameters gather their parts first); the loader reads just the slices each
    device shard needs.
    """
    with contextlib.ExitStack() as stack:
        for f in files:
            fh = stack.enter_context(safe_open(str(f), framework="numpy"))
            for name in fh.keys():
                yield name, LazyTensor(fh, name)
