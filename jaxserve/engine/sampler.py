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
    """The sampled tokens' log-probabilities and the ``MAX_LOGPROBS`` most likely of each row (ids and
    values; tiny vocabularies padded with id 0 at -inf), from the raw logits. Computed only when some
    row wants them (``want_B``); otherwise zeros of the same shapes."""
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


ARGMAX_BLOCK = 128  # vocabulary entries per block of ``first_argmax``'s and ``_inverse_cdf``'s first pass


def _blocks(x_BV: jax.Array, fill: float) -> jax.Array:
    """``x`` as [B, blocks, ARGMAX_BLOCK], the last block padded with ``fill``."""
    b, v = x_BV.shape
    blocks = -(-v // ARGMAX_BLOCK)
    if blocks * ARGMAX_BLOCK != v:
        x_BV = jnp.pad(x_BV, ((0, 0), (0, blocks * ARGMAX_BLOCK - v)), constant_values=fill)
    return x_BV.reshape(b, blocks, ARGMAX_BLOCK)


def first_argmax(x_BV: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (first maximum wins; a row with a NaN gives the last index), i32[B].

    One pass over the vocabulary: each block of ``ARGMAX_BLOCK`` entries' maximum, then the first
    block holding the row's maximum and the first maximum inside it (XLA:CPU's variadic arg-reduce
    is ~4x slower over a 49k vocabulary, two full reductions ~3x).
    """
    v = x_BV.shape[-1]
    x_BNK = _blocks(x_BV, -jnp.inf)
    blocks = x_BNK.shape[1]
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


def _inverse_cdf(probs_BV: jax.Array, u_B: jax.Array) -> jax.Array:
    """The index each row's ``u`` (in [0, 1)) falls on: the number of cumulative probabilities <=
    u × the row's total, capped at the last index, i32[B].

    Two levels, as ``first_argmax``: cumulative sums of ``ARGMAX_BLOCK``-entry block sums find
    the block, then one block's cumulative sum the entry (XLA:CPU's cumsum over a whole 49k
    vocabulary is a ~2 ms reduce-window at 32 rows).
    """
    v = probs_BV.shape[-1]
    p_BNK = _blocks(probs_BV, 0.0)
    blocks = p_BNK.shape[1]
    cum_BN = jnp.cumsum(jnp.sum(p_BNK, axis=-1), axis=-1)
    target_B1 = (u_B * cum_BN[:, -1])[:, None]
    block_B = jnp.minimum(jnp.sum(cum_BN <= target_B1, axis=-1), blocks - 1)
    before_B1 = jnp.take_along_axis(jnp.pad(cum_BN, ((0, 0), (1, 0))), block_B[:, None], axis=-1)
    row_BK = jnp.take_along_axis(p_BNK, block_B[:, None, None], axis=1)[:, 0]
    inside_B = jnp.sum(before_B1 + jnp.cumsum(row_BK, axis=-1) <= target_B1, axis=-1)
    return jnp.minimum(block_B * ARGMAX_BLOCK + inside_B, v - 1).astype(jnp.int32)


def _filter_probs(probs_BV: jax.Array, st: SamplingTensors) -> jax.Array:
    """Zero the probabilities that top-k, top-p and min-p exclude (ties at the cut are kept) in the
    rows that ask for a filter (temperature > 0 and some filter set; other rows are returned as is).

    No sort (XLA:CPU sorts a [32, 49152] batch in ~250 ms): each cut is found by bisection over
    the float32 bit patterns of the probabilities (ordered as integers for values >= 0), 32 passes.
    Top-k's is the largest t with at least k probabilities >= t (the k-th largest value); top-p's
    the smallest t whose strictly larger probabilities sum to less than top_p (the value of the
    last token of the smallest sorted prefix reaching top_p); min-p's is min_p times the largest.
    """
    v = probs_BV.shape[-1]
    wants = (st.temperature > 0.0) & ((st.top_k > 0) | (st.top_p < 1.0) | (st.min_p > 0.0))
    k = jnp.where(st.top_k > 0, jnp.minimum(st.top_k, v), 1)[:, None]
    top_p = st.top_p[:, None]
    as_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)
    top_B1 = jnp.max(probs_BV, axis=-1, keepdims=True)
    hi = jax.lax.bitcast_convert_type(top_B1, jnp.int32)

    def halve(_: int, bounds: tuple) -> tuple:
        # k: count(>= k_lo) >= k > count(>= k_hi); p: mass(> p_hi) < top_p <= mass(> p_lo)
        k_lo, k_hi, p_lo, p_hi = bounds
        k_mid, p_mid = (k_lo + k_hi) // 2, (p_lo + p_hi) // 2
        k_ok = jnp.sum(probs_BV >= as_float(k_mid), axis=-1, keepdims=True) >= k
        p_ok = jnp.sum(jnp.where(probs_BV > as_float(p_mid), probs_BV, 0.0), axis=-1, keepdims=True) < top_p
        return (jnp.where(k_ok, k_mid, k_lo), jnp.where(k_ok, k_hi, k_mid),
                jnp.where(p_ok, p_lo, p_mid), jnp.where(p_ok, p_mid, p_hi))

    k_lo, _, _, p_hi = jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(hi), hi + 1, jnp.full_like(hi, -1), hi))
    kth = jnp.where(st.top_k[:, None] > 0, as_float(k_lo), 0.0)
    pth = jnp.where(top_p < 1.0, as_float(p_hi), 0.0)
    threshold = jnp.maximum(jnp.maximum(kth, pth), st.min_p[:, None] * top_B1)
    return jnp.where(~wants[:, None] | (probs_BV >= threshold), probs_BV, 0.0)


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
        """Rows with a temperature sample by inverse CDF (after top-k/top-p/min-p), keyed by (seed, step);
        greedy rows keep the argmax."""
        temp = jnp.where(is_random, st.temperature, 1.0)
        probs = jax.nn.softmax(logits_BV / temp[:, None], axis=-1)
        needs_filter = jnp.any(is_random & ((st.top_k > 0) | (st.top_p < 1.0) | (st.min_p > 0.0)))
        probs = jax.lax.cond(needs_filter, lambda p: _filter_probs(p, st), lambda p: p, probs)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(st.seed, st.step)
        u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
        idx = _inverse_cdf(probs, u)
        # A sampled index must have non-zero probability (guards float edge cases at the boundary).
        idx = jnp.where(jnp.take_along_axis(probs, idx[:, None], axis=-1)[:, 0] > 0, idx, greedy_tokens)
        return jnp.where(is_random, idx, greedy_tokens)

    tokens = jax.lax.cond(jnp.any(is_random), random_path, lambda: greedy_tokens)
    logprobs = compute_logprobs(raw_BV, tokens, st.want_logprobs)
    if mask_BW is not None and mask_BW.shape[1]:
        tokens = jnp.where(jnp.all(logits_BV == -jnp.inf, axis=-1), NO_TOKEN, tokens)
    return tokens, logprobs
