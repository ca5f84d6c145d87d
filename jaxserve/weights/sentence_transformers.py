"""Pooling, normalisation and max length of a sentence-transformers directory, read from its files.

``modules.json`` lists the pipeline (Transformer -> Pooling -> optional Normalize). Module types
are matched by class name (``sentence_transformers.models.Pooling`` and the newer
``sentence_transformers.sentence_transformer.modules.Pooling`` alike). The pooling config comes
in two formats: the older ``pooling_mode_*_tokens`` booleans and the newer ``pooling_mode``
string. A Normalize module needs no files, so its folder may be missing on disk. Any other module
(Dense, LayerNorm, ...) is refused at start-up. The max length is ``sentence_bert_config.json``'s
``max_seq_length`` (e.g. 256 for all-MiniLM-L6-v2, whose tokenizer says 512).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxserve.models.bert import PoolingConfig

SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
# Older boolean keys -> our mode names (sentence-transformers concatenates several true ones; we
# support exactly one).
_BOOLEAN_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_STRING_MODES = {"cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                 "weightedmean": "weightedmean", "lasttoken": "lasttoken"}


class SentenceTransformersError(ValueError):
    """The directory's sentence-transformers files describe something we cannot serve (one line)."""


@dataclasses.dataclass(frozen=True)
class SentenceTransformersConfig:
    pooling: PoolingConfig
    max_seq_length: int | None  # None: sentence_bert_config.json does not say


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SentenceTransformersError(f"cannot read {path}: {' '.join(str(e).split())}") from None


def pooling_mode(pooling_json: dict[str, Any], where: str) -> str:
    """The one pooling mode of a Pooling module's config.json (either format)."""
    if "pooling_mode" in pooling_json:
        name = pooling_json["pooling_mode"]
        mode = _STRING_MODES.get(name) if isinstance(name, str) else None
        if mode is None:
            raise SentenceTransformersError(f"{where}: pooling_mode {name!r} is not supported")
    else:
        modes = [m for key, m in _BOOLEAN_MODES.items() if pooling_json.get(key)]
        if len(modes) != 1:
            raise SentenceTransformersError(
                f"{where}: expected exactly one pooling_mode_* flag set, found {modes or 'none'} "
                "(concatenated poolings are not supported)")
        mode = modes[0]
    if mode == "weightedmean":
        raise SentenceTransformersError(f"{where}: weighted-mean pooling is not supported")
    if pooling_json.get("include_prompt") is False:
        raise SentenceTransformersError(f"{where}: include_prompt=false (instruction-excluded pooling) is not supported")
    return mode


def read_sentence_transformers(directory: Path) -> SentenceTransformersConfig:
    """The pipeline of ``directory/modules.json``; SentenceTransformersError for anything unsupported."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        raise SentenceTransformersError(
            f"{directory} has no modules.json: an encoder is served as a sentence-transformers model, "
            "whose modules.json and pooling config say how to pool")
    modules = _read_json(modules_path)
    mode, normalize = None, False
    for i, module in enumerate(modules):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in SUPPORTED_MODULES:
            raise SentenceTransformersError(
                f"modules.json entry {i} ({module.get('path') or module.get('name')!r}) is a {kind!r} module, which "
                f"is not supported; supported: {', '.join(SUPPORTED_MODULES)}")
        if kind == "Pooling":
            cfg_path = directory / module.get("path", "") / "config.json"
            mode = pooling_mode(_read_json(cfg_path), str(cfg_path))
        elif kind == "Normalize":
            normalize = True  # no files: its folder may be absent
        elif kind == "Transformer" and module.get("idx", i) != 0:
            raise SentenceTransformersError("modules.json: the Transformer module must come first")
    if mode is None:
        raise SentenceTransformersError(f"{modules_path} lists no Pooling module")
    st_path = directory / "sentence_bert_config.json"
    max_len = _read_json(st_path).get("max_seq_length") if st_path.is_file() else None
    return SentenceTransformersConfig(PoolingConfig(mode, normalize), int(max_len) if max_len else None)
