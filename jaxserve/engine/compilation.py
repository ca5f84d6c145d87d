"""Static step shapes ("buckets"): every step is padded to one of them, all compiled at start-up.

Two families keep the count small:
- decode-only steps (every sequence advances one token): ``B`` sequences, ``T = B``;
- mixed steps (prefill chunks, possibly with decodes): ``T`` tokens and ``B`` sequence (and logits)
  rows, each chosen by its own count: the smallest token size that holds the step's tokens and
  the smallest row size that holds its sequences (``mixed_rows``: ``min_mixed_rows`` times powers
  of ``MIXED_ROWS_FACTOR`` below ``min(T, max_num_seqs)``, then that). On CPU a lone prompt then
  does not pay for ``max_num_seqs`` rows of LM head and sampling (≈ 0.17 ms a row for SmolLM2);
  on accelerators, where those rows cost next to nothing, each T keeps one row size
  (``mixed_row_floor``), as many shapes as before.
Decode sizes are powers of two, capped at ``max_num_seqs``. Mixed sizes are powers of two up to a
step of ``MIN_PREFILL_STEP`` tokens, then every multiple of the step up to the budget
(``_prefill_sizes``): a burst of prompts pads to the next multiple, not to the next power of two;
the step doubles until at most ``MAX_LINEAR_BUCKETS`` multiples fit, which keeps large budgets'
compile count close to the powers of two's. How an attention backend tiles a step's queries is its
own business (``models/attention_backends.py``): no tile width is part of a step's shape.

Steps with a request that needs logit bias or penalties carry per-row token histories
(``extras``); to keep compiles few, such steps use the largest bucket of their family. Steps with
a grammar-constrained row (structured outputs) carry the packed token mask (``grammar``) and run
as a forward and a sample executable (``engine/step_functions.py``): decode steps at every decode
bucket, and the largest bucket of each family with extras. A grammar shape's forward depends only
on ``(T, B, decode_only)`` and its sampling only on ``(B, extras)``, so the runner compiles each
distinct one once: the forwards of the decode buckets and the largest mixed one, and a small
sampling executable per decode bucket (docs/benchmarks.md §8 has the counts and seconds). A
pooling engine (a decoder embedder: no sampling) has neither (``sampling=False``).

Start-up can compile only ``ready_shapes`` (the largest plain bucket of each family) before the
engine is ready and the rest in the background (``engine/background_compile.py``, in
``background_order``); meanwhile a step runs in the smallest ready shape of its own family that
holds it (``fallback``: padding rows and tokens cost compute, not correctness).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    """Static sizes of one compiled step."""

    num_tokens: int  # T
    num_seqs: int  # B (also the number of logits rows)
    decode_only: bool  # every sequence has at most one new token
    extras: bool = False  # carries logits-processor inputs (bias, penalty histories)
    grammar: bool = False  # carries the packed grammar mask; runs as forward + sample


MIXED_ROWS_FACTOR = 8  # mixed row sizes: min_mixed_rows × 1, 8, 64, ... (docs/benchmarks.md §15)
CPU_MIN_MIXED_ROWS = 4
MIN_PREFILL_STEP = 128  # smallest step between the large mixed buckets (docs/benchmarks.md §15)
MAX_LINEAR_BUCKETS = 4  # the step grows (powers of two) so that at most this many multiples fit


def _prefill_sizes(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` below the step, then the step's multiples up to ``hi`` (always in)."""
    step = MIN_PREFILL_STEP
    while step * MAX_LINEAR_BUCKETS < hi:
        step *= 2
    out = [s for s in _powers_of_two(lo, hi) if s < min(step, hi)]
    return out + list(range(step, hi, step)) + [hi]


def mixed_row_floor(platform: str, max_num_seqs: int) -> int:
    """``BucketPolicy.min_mixed_rows`` for a platform: fewer rows only where rows cost (CPU)."""
    return CPU_MIN_MIXED_ROWS if platform == "cpu" else max_num_seqs


def _powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2lo, 4lo, ... below hi, then hi itself."""
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    out.append(hi)
    return out


@dataclasses.dataclass(frozen=True)
class BucketPolicy:
    """Chooses the step shape for a batch; lists every shape for start-up compilation."""

    max_num_seqs: int
    max_num_batched_tokens: int
    min_prefill_tokens: int = 16
    min_decode_batch: int = 1
    min_mixed_rows: int = CPU_MIN_MIXED_ROWS  # fewest rows of a mixed step (>= max_num_seqs: one per T)
    sampling: bool = True  # False: no extras or grammar shapes (a pooling engine never samples)

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs})"
            )

    @property
    def decode_sizes(self) -> list[int]:
        # The floor holds even above max_num_seqs: padding rows are cheap, a slow path is not.
        return _powers_of_two(self.min_decode_batch, max(self.min_decode_batch, self.max_num_seqs))

    @property
    def prefill_sizes(self) -> list[int]:
        return _prefill_sizes(min(self.min_prefill_tokens, self.max_num_batched_tokens), self.max_num_batched_tokens)

    def decode_shape(self, num_seqs: int) -> StepShape:
        b = next(s for s in self.decode_sizes if s >= num_seqs)
        return StepShape(b, b, True)

    def mixed_rows(self, num_tokens: int) -> list[int]:
        """Row sizes of the mixed steps of ``num_tokens`` (a prefill size): ``min_mixed_rows``
        times powers of ``MIXED_ROWS_FACTOR`` below ``min(T, max_num_seqs)``, then that."""
        top = min(num_tokens, self.max_num_seqs)
        out, r = [], max(1, self.min_mixed_rows)
        while r < top:
            out.append(r)
            r *= MIXED_ROWS_FACTOR
        return [*out, top]

    def mixed_shape(self, num_tokens: int, num_seqs: int | None = None) -> StepShape:
        """The smallest mixed bucket holding ``num_tokens`` tokens and ``num_seqs`` sequences
        (None: the most rows of that token size)."""
        t = next(s for s in self.prefill_sizes if s >= num_tokens)
        rows = self.mixed_rows(t)
        return StepShape(t, rows[-1] if num_seqs is None else next(r for r in rows if r >= num_seqs), False)

    def shape_for(self, num_seqs: int, num_tokens: int, extras: bool = False, grammar: bool = False) -> StepShape:
        """The compiled shape a step of ``num_seqs`` sequences and ``num_tokens`` tokens runs in.

        Decode-only (one token per sequence) and plain: the smallest decode bucket; mixed: the
        smallest mixed bucket. ``extras`` (logits processors) take the single largest shape of their
        family, and ``grammar`` the grammar variant (decode buckets keep their size without extras).
        Raises ValueError past the configured maxima."""
        if num_seqs > self.max_num_seqs or num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"batch of {num_seqs} seqs / {num_tokens} tokens exceeds the configured maxima")
        decode = num_tokens == num_seqs
        if grammar and decode and not extras:
            return dataclasses.replace(self.decode_shape(num_seqs), grammar=True)
        if grammar:
            return dataclasses.replace(self._extras_shape(decode), grammar=True)
        if extras:
            return self._extras_shape(decode)
        return self.decode_shape(num_seqs) if decode else self.mixed_shape(num_tokens, num_seqs)

    def _extras_shape(self, decode: bool) -> StepShape:
        base = self.decode_shape(self.max_num_seqs) if decode else self.mixed_shape(self.max_num_batched_tokens)
        return dataclasses.replace(base, extras=True)

    def ready_shapes(self) -> list[StepShape]:
        """The shapes every batch without extras or a grammar fits in: the largest of each family."""
        return sorted({self.decode_shape(self.max_num_seqs), self.mixed_shape(self.max_num_batched_tokens)})

    def background_order(self) -> list[StepShape]:
        """Every other shape, most useful first: plain buckets by tokens (small decodes and short
        prefills are the ones that run far below their padded ready shape; at equal tokens the
        decode step, the most frequent, then fewer rows first), then the shapes only logits
        processors and grammars use."""
        rest = set(self.all_shapes()) - set(self.ready_shapes())
        return sorted(rest, key=lambda s: (s.grammar, s.extras, s.num_tokens, not s.decode_only, s.num_seqs))

    @staticmethod
    def fallback(shape: StepShape, available: Iterable[StepShape]) -> StepShape | None:
        """The smallest of ``available`` that holds a step of ``shape``: same family (decode-only,
        extras, grammar), at least as many tokens and sequences; None if there is none."""
        fits = [s for s in available if (s.decode_only, s.extras, s.grammar) == (shape.decode_only, shape.extras,
                shape.grammar) and s.num_tokens >= shape.num_tokens and s.num_seqs >= shape.num_seqs]
        return min(fits, default=None)

    def all_shapes(self) -> list[StepShape]:
        """Every shape ``shape_for`` can return, sorted: the decode and mixed buckets; with sampling
        (a generating model) also the extras and grammar variants."""
        shapes = {self.decode_shape(b) for b in self.decode_sizes}
        shapes |= {StepShape(t, b, False) for t in self.prefill_sizes for b in self.mixed_rows(t)}
        if not self.sampling:
            return sorted(shapes)
        shapes |= {self._extras_shape(True), self._extras_shape(False)}
        shapes |= {dataclasses.replace(s, grammar=True) for s in (self._extras_shape(True), self._extras_shape(False))}
        shapes |= {dataclasses.replace(self.decode_shape(b), grammar=True) for b in self.decode_sizes}
        return sorted(shapes)
