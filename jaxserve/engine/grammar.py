"""Structured outputs: grammars compiled by llguidance, one matcher per request, packed token masks.

``GrammarCompiler`` turns a ``StructuredOutput`` (JSON schema, any JSON object, regex, choice,
Lark/GBNF grammar) into a ``CompiledGrammar``: a validated llguidance matcher in its start state,
cached by the spec (LRU). Compiling is thread-safe and meant to run off the engine thread
(``AsyncEngine.compile_grammars`` runs it in a worker thread with a timeout); a spec llguidance
rejects raises ``GrammarError`` naming the problem. Each engine request gets its own
``GrammarMatcher`` (a copy of the compiled start state) that consumes the request's tokens on the
host and fills its row of the step's packed mask: int32 ``[B, ceil(V/32)]``, bit ``t % 32`` of
word ``t // 32`` set when token ``t`` is allowed (rows without a grammar are all ones).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import threading
import time

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from jaxserve.sampling_params import SamplingParamError, StructuredOutput
from jaxserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Compact JSON with Python's separators: no free whitespace for a model to wander into (llguidance
# notes: set separators explicitly when whitespace is not flexible; allow general \u escapes).
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "json_allow_general_unicode_escapes": True,
}
CACHE_SIZE = 256


COMPILE_TIMEOUT_S = 10.0  # AsyncEngine's limit on one compile (a 400 after it)


class GrammarError(SamplingParamError):
    """A structured-output spec that cannot be compiled; ``param`` is the request field that sent it."""

    def __init__(self, spec: StructuredOutput, why: str) -> None:
        super().__init__(spec.param, f"{spec.param}: {why}")


def mask_width(vocab_size: int) -> int:
    """Words of the packed mask: ceil(V / 32)."""
    return (vocab_size + 31) // 32


def _grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar definition for ``spec`` (not validated yet)."""
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in json.loads(spec.spec))
        )
    if spec.kind == "grammar":  # Lark, or GBNF as vLLM users send it (converted to Lark)
        return llguidance.grammar_from("grammar", spec.spec)
    raise GrammarError(spec, f"unknown structured output kind {spec.kind!r}")


class CompiledGrammar:
    """A validated grammar in its start state; ``matcher()`` gives each request its own copy."""

    def __init__(self, spec: StructuredOutput, start: llguidance.LLMatcher, compile_ms: float) -> None:
        self.spec = spec
        self._start = start
        self._lock = threading.Lock()
        self.compile_ms = compile_ms

    def matcher(self) -> GrammarMatcher:
        with self._lock:
            return GrammarMatcher(self._start.deep_copy())


class GrammarMatcher:
    """One request's position in its grammar (host side; the engine thread owns it)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def consume(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it (the matcher is then in error)."""
        return self._m.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete (only EOS could follow) or in error: generation should stop."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()

    @property
    def ll(self) -> llguidance.LLMatcher:
        return self._m


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer and vocabulary (thread-safe)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self._hf = tokenizer
        self._eos = list(eos_token_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[StructuredOutput, CompiledGrammar] = collections.OrderedDict()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer, built on first use (1.8 s for SmolLM2's 49k tokens on a busy 2-core CPU)."""
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._ll

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar for ``spec`` (cached); GrammarError names what is wrong with it."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        ll = self._tokenizer()
        t0 = time.perf_counter()
        try:
            text = _grammar_text(spec)
        except (ValueError, TypeError) as e:
            raise GrammarError(spec, f"invalid {spec.kind.replace('_', ' ')}: {e}") from None
        matcher = llguidance.LLMatcher(ll, text, log_level=0)
        if matcher.is_error():
            why = " ".join(matcher.get_error().split())
            raise GrammarError(spec, f"invalid {spec.kind.replace('_', ' ')}: {why}")
        compiled = CompiledGrammar(spec, matcher, (time.perf_counter() - t0) * 1e3)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for filling many rows at once (made on first use)."""
    return llguidance.LLExecutor()


def build_mask(rows: list[tuple[int, GrammarMatcher]], num_rows: int, vocab_size: int) -> np.ndarray:
    """The step's packed mask: all ones, then each ``(row, matcher)``'s allowed tokens."""
    mask_BW = np.full((num_rows, mask_width(vocab_size)), -1, np.int32)
    if len(rows) == 1:
        llguidance.numpy.fill_next_token_bitmask(rows[0][1].ll, mask_BW, rows[0][0])
    elif rows:
        llguidance.numpy.fill_next_token_bitmask_par(_executor(), [(m.ll, row) for row, m in rows], mask_BW)
    return mask_BW
