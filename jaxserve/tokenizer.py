"""Tokenizer loading (HF directory or GGUF metadata, through ``transformers``) and incremental
detokenization that never emits half of a multi-byte character."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from jaxserve.weights.source import ModelSource

logger = logging.getLogger(__name__)

Tokenizer = PreTrainedTokenizerBase


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, cache_dir: str | None = None) -> Tokenizer:
    """The HF tokenizer (with chat template) for ``source``; ``tokenizer`` overrides the location.

    A tokenizer rebuilt from GGUF metadata (seconds of work) is saved under ``cache_dir`` keyed by
    the file's name, size and mtime, and loaded from there next time.
    """
    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    if source.kind != "gguf":  # HF directories and converted checkpoints carry tokenizer files
        return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    cached = None
    if cache_dir:
        st = source.path.stat()
        cached = Path(cache_dir) / f"{source.path.stem}-{st.st_size}-{int(st.st_mtime)}"
        if (cached / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            except Exception as e:  # noqa: BLE001 - a broken cache entry is rebuilt
                logger.warning("ignoring tokenizer cache %s: %s", cached, e)
    tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    if cached is not None:
        try:
            tok.save_pretrained(str(cached))
        except OSError as e:
            logger.warning("could not cache the tokenizer in %s: %s", cached, e)
    return tok


def eos_token_ids(tok: Tokenizer, model_eos: tuple[int, ...], generation_config: dict[str, Any]) -> tuple[int, ...]:
    """Every id that ends generation: generation_config's, the model config's and the tokenizer's."""
    ids: list[int] = []
    gen = generation_config.get("eos_token_id")
    for v in ([gen] if isinstance(gen, int) else list(gen or [])) + list(model_eos) + [tok.eos_token_id]:
        if v is not None and v not in ids:
            ids.append(int(v))
    return tuple(ids)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a small window of recent tokens and emits only the new suffix once it does not end
    in U+FFFD (an incomplete UTF-8 sequence), so a multi-byte character is never split.
    """

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], *, skip_special_tokens: bool = True) -> None:
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:])  # context so leading spaces decode correctly
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly complete text (possibly empty)."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is left, even an incomplete character."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        delta = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
