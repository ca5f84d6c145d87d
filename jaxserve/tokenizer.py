"""Tokenizer loading (HF directory or GGUF metadata, through ``transformers``) and incremental
detokenization that never emits half of a multi-byte character."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream
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
    """Turns a growing list of token ids into text deltas with ``tokenizers``' ``DecodeStream``.

    The stream decodes one small window per token (the hand-written version it replaced decoded
    two; ``scripts/bench_detokenize.py``) and holds text back while it would end in an incomplete
    UTF-8 sequence, so a multi-byte character is never split.
    """

    CONTEXT = 6  # prompt tokens decoded first so that leading spaces of the output come out right

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], *, skip_special_tokens: bool = True) -> None:
        self.tok = tok
        self.backend = tok.backend_tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        context = prompt_ids[-self.CONTEXT :]
        seen = sum(len(self.stream.step(self.backend, t) or "") for t in context)
        # Text of a prompt that ends inside a character is the prompt's, not the output's.
        self.skip = max(0, len(tok.decode(context, skip_special_tokens=skip_special_tokens)) - seen)
        self.held: list[int] = []  # tokens whose text the stream still holds back
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly complete text (possibly empty)."""
        delta = ""
        for t in token_ids:
            piece = self.stream.step(self.backend, t)
            if piece is None:
                self.held.append(t)
            else:
                delta += piece
                self.held.clear()
        if self.skip and delta:
            delta, self.skip = delta[self.skip :], max(0, self.skip - len(delta))
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: whatever is held back, even an incomplete character."""
        delta = self.tok.decode(self.held, skip_special_tokens=self.skip_special_tokens) if self.held else ""
        self.held.clear()
        self.text += delta
        return delta
