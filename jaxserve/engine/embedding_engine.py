"""The embedding engine (encoders, and decoders as embedders): token-id lists in, one pooled vector
each out; no KV cache, no scheduler.

Sequences are grouped longest first into ``[B, L]`` batches padded to a shape of ``EmbedBuckets``
(L: powers of two from 16 up to the max length; B: powers of two up to ``max_num_seqs`` with
``B·L`` within ``max_num_batched_tokens``, and always B = 1). Every shape is compiled ahead of time
and run once at start-up; serving only looks executables up, so it cannot compile.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ServeConfig
from jaxserve.engine.embedders import Embedder, load_embedder
from jaxserve.models.bert import pool
from jaxserve.sampling_params import SamplingParamError
from jaxserve.tokenizer import Tokenizer, load_tokenizer
from jaxserve.weights.source import resolve_model_source

logger = logging.getLogger(__name__)

MIN_LEN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class EmbedInfo:
    """Constants of a started embedding engine (what the server may read)."""

    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    hidden_size: int
    matryoshka_dimensions: tuple[int, ...] | None  # None: no `dimensions`; (): any size up to hidden_size
    task: str = "embed"


@dataclasses.dataclass(frozen=True)
class EmbedBuckets:
    """The compiled ``(batch, length)`` shapes and how a group of sequences picks one."""

    max_len: int
    max_num_seqs: int
    max_tokens: int

    @property
    def lengths(self) -> list[int]:
        """The compiled sequence lengths: powers of two from ``MIN_LEN_BUCKET`` below ``max_len``, then ``max_len``."""
        out, n = [], MIN_LEN_BUCKET
        while n < self.max_len:
            out.append(n)
            n *= 2
        return [*out, self.max_len]

    def batch_sizes(self, length: int) -> list[int]:
        """The compiled batch sizes for ``length``: 1, then powers of two within ``max_num_seqs`` and ``max_tokens``."""
        out, b = [1], 2
        while b <= self.max_num_seqs and b * length <= self.max_tokens:
            out.append(b)
            b *= 2
        return out

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(b, n) for n in self.lengths for b in self.batch_sizes(n)]

    def length_for(self, n: int) -> int:
        return next(b for b in self.lengths if b >= n)

    def plan(self, lengths: list[int]) -> list[tuple[list[int], tuple[int, int]]]:
        """Indices of ``lengths`` grouped into batches, longest first, each with its padded shape; a batch
        holds only sequences of its length bucket (padding stays under half a row)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches = []
        while order:
            seq_len = self.length_for(lengths[order[0]])
            sizes = self.batch_sizes(seq_len)
            same = sum(1 for i in order[: sizes[-1]] if self.length_for(lengths[i]) == seq_len)
            take, order = order[:same], order[same:]
            batches.append((take, (next(b for b in sizes if b >= len(take)), seq_len)))
        return batches


def check_inputs(seqs: list[list[int]], info: EmbedInfo) -> None:
    """Admission for embeddings: non-empty, within the max length, ids in the vocabulary."""
    for i, s in enumerate(seqs):
        if not s:
            raise SamplingParamError("input", f"input {i} is empty")
        if len(s) > info.max_model_len:
            raise SamplingParamError(
                "input", f"input {i} has {len(s)} tokens, over this model's maximum of {info.max_model_len} "
                "(set truncate_prompt_tokens to truncate it)")
        bad = next((t for t in s if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise SamplingParamError("input", f"token id {bad} is out of range [0, {info.vocab_size})")


def _max_len(requested: int | None, default: int | None, positions: int) -> int:
    limit = default or positions
    if requested is not None and requested > positions:
        raise ValueError(f"max_model_len {requested} exceeds the model's {positions} positions")
    return min(requested or limit, positions)


class EmbeddingEngine:
    """Loads the embedder (encoder or decoder), compiles every bucket, then embeds synchronously
    (one thread calls it)."""

    def __init__(self, config: ServeConfig) -> None:
        source = resolve_model_source(config.model)
        t0 = time.perf_counter()
        self.model: Embedder = load_embedder(config, source)
        m = self.model
        max_len = _max_len(config.max_model_len, m.default_max_len, m.positions)
        self.buckets = EmbedBuckets(max_len, config.max_num_seqs, max(config.max_num_batched_tokens, max_len))
        self.info = EmbedInfo(load_tokenizer(source, config.tokenizer), max_len, m.vocab_size, m.hidden_size,
                              m.matryoshka_dimensions)
        logger.info("embedding model loaded in %.1f s (%s pooling%s, max length %d)", time.perf_counter() - t0,
                    m.pooling.mode, ", normalised" if m.pooling.normalize else "", max_len)
        self._compiled = self._compile_all()

    def _step(self, state: nnx.State, ids_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
        model = nnx.merge(self.model.graphdef, state)
        return pool(self.model.forward(model, ids_BL, mask_BL), mask_BL, self.model.pooling)

    def _compile_all(self) -> dict[tuple[int, int], Any]:
        t0 = time.perf_counter()
        compiled = {}
        for b, n in self.buckets.shapes:
            ids = jax.ShapeDtypeStruct((b, n), jnp.int32)
            mask = jax.ShapeDtypeStruct((b, n), jnp.bool_)
            compiled[(b, n)] = jax.jit(self._step).lower(self.model.state, ids, mask).compile()
            compiled[(b, n)](self.model.state, np.zeros((b, n), np.int32), np.ones((b, n), bool)).block_until_ready()
        logger.info("compiled and ran %d embedding shapes in %.1f s", len(compiled), time.perf_counter() - t0)
        return compiled

    def embed(self, seqs: list[list[int]]) -> np.ndarray:
        """One float32 vector per sequence, in order (``check_inputs`` has admitted them)."""
        out = np.empty((len(seqs), self.model.hidden_size), np.float32)
        for take, (b, n) in self.buckets.plan([len(s) for s in seqs]):
            ids = np.full((b, n), self.model.pad_id, np.int32)
            mask = np.zeros((b, n), bool)
            for row, i in enumerate(take):
                ids[row, : len(seqs[i])] = seqs[i]
                mask[row, : len(seqs[i])] = True
            mask[len(take):, 0] = True  # padding rows attend to one token (no all-masked softmax)
            vecs = np.asarray(self._compiled[(b, n)](self.model.state, ids, mask))
            out[take] = vecs[: len(take)]
        return out
