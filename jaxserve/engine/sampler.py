"""On-device token sampling: processors, greedy, temperature, top-k, top-p, min-p, seeds, logprobs.

Randomness for row ``b`` comes from ``fold_in(key(seed_b), step_b)`` where ``step_b`` is the
number of tokens that sequence has generated, so a seeded request samples the same tokens
whatever else shares its batch. Filters run only when some row needs them (``lax.cond``), and
an all-greedy batch skips the random path entirely.

Logprobs are those of the raw model output (before bias, penalties and temperature), like vLLM's
default; they are computed only when some row asks for them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.logits_processors import LogitsExtras, apply_logits_processors
from jaxserve.request import NO_TOKEN
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams


@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling settings for one step (a pytree of [B] arrays)."""

    temperature: jax.Array  # f32[B]; 0 = greedy
    top_p: jax.Array  # f32[B]; 1 = off
    top_k: jax.Array  # i32[B]; 0 = off
    min_p: jax.Array  # f32[B]; 0 = off
    seed: jax.Array  # u32[B]
    step: jax.Array  # i32[B] tokens generated so far (the PRNG counter)
    want_logprobs: jax.Array  # bool[B]


jax.tree_util.register_dataclass(
    SamplingTensors,
    data_fields=[f.name for f in dataclasses.fields(SamplingTensors)],
    meta_fields=[],
)


def build_sampling_tensors(
    params: list[SamplingParams], seeds: list[int], steps: list[int], num_rows: int
) -> SamplingTensors:
    """Host arrays padded to ``num_rows`` (padding rows are greedy)."""
    n = len(params)
    temp = np.zeros(num_rows, np.float32)
    top_p = np.ones(num_rows, np.float32)
    top_k = np.zeros(num_rows, np.int32)
    min_p = np.zeros(num_rows, np.float32)
    seed = np.zeros(num_rows, np.uint32)
    step = np.zeros(num_rows, np.int32)
    want = np.zeros(num_rows, np.bool_)
    # one numpy assignment per field from a list (per-element numpy writes cost host time every step)
    temp[:n] = [p.temperature for p in params]
    top_p[:n] = [p.top_p for p in params]
    top_k[:n] = [max(p.top_k, 0) for p in params]
    min_p[:n] = [p.min_p for p in params]
    want[:n] = [p.logprobs is not None for p in params]
    seed[:n] = [s & 0xFFFFFFFF for s in seeds]
    step[:n] = steps
    return SamplingTensors(temp, top_p, top_k, min_p, seed, step, want)


@dataclasses.dataclass
class LogprobsOut:
    """Raw-model logprobs of the sampled token and the top MAX_LOGPROBS (zeros when not requested)."""

    sampled: jax.Array  # f32[B]
    top_ids: jax.Array  # i32[B, MAX_LOGPROBS]
    top_vals: jax.Array  # f32[B, MAX_LOGPROBS]


jax.tree_util.register_dataclass(
    LogprobsOut, data_fields=[f.name for f in dataclasses.fields(LogprobsOut)], meta_fields=[]
)


def compute_logprobs(logits_BV: jax.Array, tokens_B: jax.Array, want_B: jax.Array) -> LogprobsOut:
    b = logits_BV.shape[0]

    def compute() -> LogprobsOut:
        lp = jax.nn.log_softmax(logits_BV, axis=-1)
        k = min(MAX_LOGPROBS, lp.shape[-1])
        top_vals, top_ids = jax.lax.top_k(lp, k)
        if k < MAX_LOGPROBS:  # tiny vocabularies (tests)
            top_vals = jnp.pad(top_vals, ((0, 0), (0, MAX_LOGPROBS - k)), constant_values=-jnp.inf)
            top_ids = jnp.pad(top_ids, ((0, 0), (0, MAX_LOGPROBS - k)))
        sampled = jnp.take_along_axis(lp, tokens_B[:, None], axis=-1)[:, 0]
        return LogprobsOut(sampled, top_ids.astype(jnp.int32), top_vals)

    def skip() -> LogprobsOut:
        return LogprobsOut(
            jnp.zeros((b,), jnp.float32),
            jnp.zeros((b, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((b, MAX_LOGPROBS), jnp.float32),
        )

    return jax.lax.cond(jnp.any(want_B), compute, skip)


ARGMAX_BLOCK = 128  # vocabulary entries per block of ``first_argmax``'s first pass
FILTER_PREFIXES = (256, 2048)  # sorted prefixes ``_filter_probs`` tries before a full sort


def first_argmax(x_BV: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (first maximum wins; a row with a NaN gives the last index), i32[B].

    One pass over the vocabulary: each block of ``ARGMAX_BLOCK`` entries' maximum, then the first
    block holding the row's maximum and the first maximum inside it (XLA:CPU's variadic arg-reduce
    is ~4x slower over a 49k vocabulary, two full reductions ~3x).
    """
    b, v = x_BV.shape
    blocks = -(-v // ARGMAX_BLOCK)
    if blocks * ARGMAX_BLOCK != v:
        x_BV = jnp.pad(x_BV, ((0, 0), (0, blocks * ARGMAX_BLOCK - v)), constant_values=-jnp.inf)
    x_BNK = x_BV.reshape(b, blocks, ARGMAX_BLOCK)
    top_BN = jnp.max(x_BNK, axis=-1)
    block_B = _first_max(top_BN)
    row_BK = jnp.take_along_axis(x_BNK, jnp.minimum(block_B, blocks - 1)[:, None, None], axis=1)[:, 0]
    idx = block_B * ARGMAX_BLOCK + _first_max(row_BK)
    return jnp.where(jnp.isnan(jnp.max(top_BN, axis=-1)), v - 1, jnp.minimum(idx, v - 1))


def _first_max(x_BV: jax.Array) -> jax.Array:
    """Index of the first maximum of each row (the row's length where none equals it: NaN), i32[B]."""
    v = x_BV.shape[-1]
    m = jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_BV == m, jnp.arange(v, dtype=jnp.int32)[None, :], v), axis=-1)


def _thresholds(sorted_BN: jax.Array, st: SamplingTensors, v: int) -> tuple[jax.Array, jax.Array]:
    """The keep threshold of top-k, top-p and min-p per row from the row's N largest probabilities
    (descending), and whether N sufficed: a cut beyond the prefix is at most its last value, so the
    threshold is exact when a cut inside the prefix (or min-p's) is at least that value."""
    n = sorted_BN.shape[-1]
    k = jnp.where(st.top_k > 0, jnp.minimum(st.top_k, v), v)
    kth = jnp.take_along_axis(sorted_BN, (jnp.minimum(k, n) - 1)[:, None], axis=-1)[:, 0]
    cum = jnp.cumsum(sorted_BN, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: token i is in if the mass before it < top_p.
    n_top_p = jnp.maximum(jnp.sum((cum - sorted_BN) < st.top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(sorted_BN, (n_top_p - 1)[:, None], axis=-1)[:, 0]
    mth = st.min_p * sorted_BN[:, 0]
    if n == v:
        return jnp.maximum(jnp.maximum(kth, pth), mth), jnp.ones(k.shape, jnp.bool_)
    known = jnp.maximum(jnp.maximum(jnp.where(k <= n, kth, 0.0), jnp.where(cum[:, -1] >= st.top_p, pth, 0.0)), mth)
    return known, known >= sorted_BN[:, -1]


def _filter_probs(probs_BV: jax.Array, st: SamplingTensors, prefixes: tuple[int, ...] = FILTER_PREFIXES) -> jax.Array:
    """Zero the probabilities that top-k, top-p and min-p exclude (ties at the cut are kept) in the
    rows that ask for a filter. The cuts come from the rows' largest ``prefixes[0]`` probabilities
    (``lax.top_k``), a longer prefix when a row's cut lies beyond it, and a full sort last."""
    v = probs_BV.shape[-1]
    wants = (st.temperature > 0.0) & ((st.top_k > 0) | (st.top_p < 1.0) | (st.min_p > 0.0))

    def cut(threshold_B: jax.Array) -> jax.Array:
        return jnp.where(~wants[:, None] | (probs_BV >= threshold_B[:, None]), probs_BV, 0.0)

    def full_sort() -> jax.Array:
        return cut(_thresholds(-jnp.sort(-probs_BV, axis=-1), st, v)[0])

    def from_prefix(i: int) -> jax.Array:
        if i == len(prefixes) or prefixes[i] >= v:
            return full_sort()
        threshold, exact = _thresholds(jax.lax.top_k(probs_BV, prefixes[i])[0], st, v)
        return jax.lax.cond(jnp.all(exact | ~wants), lambda: cut(threshold), lambda: from_prefix(i + 1))

    return from_prefix(0)


def apply_grammar_mask(logits_BV: jax.Array, mask_BW: jax.Array) -> jax.Array:
    """-inf where the packed mask's bit is clear (bit ``t % 32`` of word ``t // 32``); a no-op at
    trace time when the mask is zero-width (steps without a grammar row)."""
    if not mask_BW.shape[1]:
        return logits_BV
    b, v = logits_BV.shape
    bits = jnp.arange(32, dtype=jnp.int32)
    allowed = ((mask_BW[:, :, None] >> bits) & 1).reshape(b, -1)[:, :v]
    return jnp.where(allowed.astype(jnp.bool_), logits_BV, -jnp.inf)


def sample(
    logits_BV: jax.Array, st: SamplingTensors, extras: LogitsExtras, mask_BW: jax.Array | None = None
) -> tuple[jax.Array, LogprobsOut]:
    """Next token per row (i32[B]) and the logprobs rows asked for.

    With a grammar mask, a row that allows no token at all (after bias) gets ``NO_TOKEN``.
    """
    raw_BV = logits_BV
    if mask_BW is not None:
        logits_BV = apply_grammar_mask(logits_BV, mask_BW)
    logits_BV = apply_logits_processors(logits_BV, extras)
    greedy_tokens = first_argmax(logits_BV)
    is_random = st.temperature > 0.0

    def random_path() -> jax.Array:
        temp = jnp.where(is_random, st.temperature, 1.0)
        probs = jax.nn.softmax(logits_BV / temp[:, None], axis=-1)
        needs_filter = jnp.any(is_random & ((st.top_k > 0) | (st.top_p < 1.0) | (st.min_p > 0.0)))
        probs = jax.lax.cond(needs_filter, lambda p: _filter_probs(p, st), lambda p: p, probs)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(st.seed, st.step)
        u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
        cum = jnp.cumsum(probs, axis=-1)
        target = u * cum[:, -1]
        idx = jnp.sum(cum <= target[:, None], axis=-1)
        idx = jnp.minimum(idx, logits_BV.shape[-1] - 1).astype(jnp.int32)
        # A sampled index must have non-zero probability (guards float edge cases at the boundary).
        idx = jnp.where(jnp.take_along_axis(probs, idx[:, None], axis=-1)[:, 0] > 0, idx, greedy_tokens)
        return jnp.where(is_random, idx, greedy_tokens)

    tokens = jax.lax.cond(jnp.any(is_random), random_path, lambda: greedy_tokens)
    logprobs = compute_logprobs(raw_BV, tokens, st.want_logprobs)
    if mask_BW is not None and mask_BW.shape[1]:
        tokens = jnp.where(jnp.all(logits_BV == -jnp.inf, axis=-1), NO_TOKEN, tokens)
    return tokens, logprobs
