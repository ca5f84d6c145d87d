"""Logprobs in OpenAI's two shapes: chat ``content[{token, logprob, bytes, top_logprobs}]`` and
completions ``{tokens, token_logprobs, top_logprobs, text_offset}``."""

from __future__ import annotations

import functools
import math
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

from jaxserve.engine.output_processor import TokenLogprob
from jaxserve.tokenizer import Tokenizer


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (transformers' own table), reversed: stand-in character -> byte."""
    return {c: b for b, c in bytes_to_unicode().items()}


class TokenText:
    """The exact bytes of single tokens, and their text (possibly a partial UTF-8 character).

    With ``as_ids`` the text is vLLM's ``token_id:<id>`` form instead.
    """

    def __init__(self, tok: Tokenizer, as_ids: bool = False) -> None:
        self.tok = tok
        self.as_ids = as_ids
        decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
        self.byte_level = decoder is not None and "ByteLevel" in type(decoder).__name__
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        piece = self.tok.convert_ids_to_tokens(token_id)
        raw: bytes | None = None
        if self.byte_level and piece is not None:
            dec = _byte_decoder()
            if all(ch in dec for ch in piece):
                raw = bytes(dec[ch] for ch in piece)
        elif piece is not None and piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            raw = bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        if raw is None:
            raw = self.tok.decode([token_id]).encode("utf-8")
        text = f"token_id:{token_id}" if self.as_ids else raw.decode("utf-8", errors="replace")
        self._cache[token_id] = (text, list(raw))
        return self._cache[token_id]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI clients expect numbers


def chat_logprobs(tt: TokenText, lps: list[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: per token its text, logprob, UTF-8 bytes and top alternatives
    (-inf as -9999, JSON has no infinity)."""
    content = []
    for lp in lps:
        text, raw = tt(lp.token_id)
        content.append({
            "token": text, "logprob": _finite(lp.logprob), "bytes": raw,
            "top_logprobs": [
                {"token": tt(t)[0], "logprob": _finite(v), "bytes": tt(t)[1]} for t, v in lp.top
            ],
        })
    return {"content": content, "refusal": None}


def completion_logprobs(tt: TokenText, lps: list[TokenLogprob], text_start: int) -> dict[str, Any]:
    """``text_offset`` counts characters from the start of the choice's text (after any echo)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    pos = text_start
    for lp in lps:
        text, _ = tt(lp.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(lp.logprob))
        alternatives: dict[str, float] = {}
        for t, v in lp.top:
            alternatives.setdefault(tt(t)[0], _finite(v))
        top.append(alternatives)
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
