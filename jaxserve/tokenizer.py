"""Tokenizer loading (HF directory, or GGUF metadata rebuilt without torch) and incremental
detokenization that never emits half of a multi-byte character."""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from jaxserve.weights.gguf_tokenizer import load_gguf_tokenizer
from jaxserve.weights.source import ModelSource

Tokenizer = PreTrainedTokenizerBase


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Tokenizer:
    """The HF tokenizer (with chat template) for ``source``; ``tokenizer`` overrides the location.

    A GGUF file's is rebuilt from its metadata without torch (``weights/gguf_tokenizer.py``).
    """
    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    if source.kind == "gguf":
        return load_gguf_tokenizer(source.path)
    return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)  # HF / converted directories


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
