"""Pure-jnp attention for prefill steps that reads this step's own K/V directly (the CPU path).

The same result as ``ref_ragged_paged_attention`` for a step whose pages already hold its K/V,
split by where each key comes from:

- keys written this step: each query attends its own sequence's new tokens straight from the
  step's flat ``k_TKH`` / ``v_TKH`` — causal attention, block-diagonal over the packed sequences,
  computed on tiles of ``tile`` tokens along the diagonal (no page gather);
- keys cached before this step (a prefix-cache hit, an earlier chunk, a decode row's context): read
  from the pages as the reference does, up to each sequence's prefix only.

The two online-softmax states merge per token. A step whose every sequence starts at position 0
gathers no page at all (the prefix part is skipped); the choice is per sequence and made on device
from the metadata, so it adds no compiled shape. Shape letters as in ``reference.py``; I tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import RaggedMetadata
from jaxserve.pallas_kernels.ragged_paged_attention.reference import (
    paged_softmax_state, row_layout, scatter_rows, validate_inputs,
)

DEFAULT_TILE = 64  # queries and keys per diagonal tile


def ref_prefill_attention(
    q_TNH: jax.Array,
    k_TKH: jax.Array,
    v_TKH: jax.Array,
    k_pages_PSKH: jax.Array,
    v_pages_PSKH: jax.Array,
    meta: RaggedMetadata,
    *,
    sm_scale: float,
    tile: int = DEFAULT_TILE,
) -> jax.Array:
    """Causal attention of each sequence's new queries over its prefix (pages) and its new K/V (direct).

    Args:
      q_TNH, k_TKH, v_TKH: this step's queries and new K/V, sequences concatenated (``meta``'s layout).
      k_pages_PSKH, v_pages_PSKH: the paged cache; only positions before each sequence's first new
        token are read from it. The new K/V are rounded to the pages' dtype, as a page read would.
    Returns:
      [T, N, H] in q's dtype; rows of padding tokens are zero.
    """
    validate_inputs(q_TNH, k_pages_PSKH, v_pages_PSKH, meta)
    t, n, h = q_TNH.shape
    kh = k_pages_PSKH.shape[2]
    g = n // kh
    k_TKH, v_TKH = (x.astype(k_pages_PSKH.dtype) for x in (k_TKH, v_TKH))
    m2, l2, acc2 = _fresh_softmax_state(q_TNH, k_TKH, v_TKH, meta, sm_scale=sm_scale, tile=tile)  # [T, K, G(, H)]

    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    prefix = meta.seq_lens - q_lens  # [B] positions cached before this step

    def with_prefix(_: None) -> tuple[jax.Array, jax.Array, jax.Array]:
        rows = row_layout(meta, t)
        rows = dataclasses.replace(rows, kv_len=prefix[meta.row_seq])
        m1, l1, acc1 = paged_softmax_state(q_TNH, k_pages_PSKH, v_pages_PSKH, meta, rows, sm_scale=sm_scale)
        r, qw = rows.q_pos.shape
        # [R, K, G, Q, H+2] -> [R, Q, K*G, H+2] -> flat tokens (tokens without a row: zeros, l = 0)
        packed = jnp.concatenate([m1[..., None], l1[..., None], acc1], axis=-1)
        packed = packed.transpose(0, 3, 1, 2, 4).reshape(r, qw, n, h + 2)
        flat = scatter_rows(packed, rows, t).reshape(t, kh, g, h + 2)
        m1 = jnp.where(flat[..., 1] > 0, flat[..., 0], -jnp.inf)
        return m1, flat[..., 1], flat[..., 2:]

    def without_prefix(_: None) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jnp.full_like(m2, -jnp.inf), jnp.zeros_like(l2), jnp.zeros_like(acc2)

    m1, l1, acc1 = jax.lax.cond(jnp.max(prefix, initial=0) > 0, with_prefix, without_prefix, None)
    m = jnp.maximum(m1, m2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    a1, a2 = jnp.exp(m1 - m_safe), jnp.exp(m2 - m_safe)  # exp(-inf) = 0 for an empty part
    l_f = a1 * l1 + a2 * l2
    acc = a1[..., None] * acc1 + a2[..., None] * acc2
    out = acc / jnp.where(l_f > 0, l_f, 1.0)[..., None]
    return out.reshape(t, n, h).astype(q_TNH.dtype)


def _fresh_softmax_state(
    q_TNH: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array, meta: RaggedMetadata, *, sm_scale: float, tile: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax state of every token over its own sequence's new keys up to itself:
    (max, sum, acc) as [T, K, G], [T, K, G], [T, K, G, H], float32. Query tile i meets key tile
    i - d for d = 0 .. the farthest tile any sequence reaches back (a dynamic trip count)."""
    t, n, h = q_TNH.shape
    kh = k_TKH.shape[1]
    g = n // kh
    tile = min(tile, t)
    tp = -(-t // tile) * tile
    nt = tp // tile
    qsl = meta.query_start_loc
    tok = jnp.arange(tp, dtype=jnp.int32)
    seq = jnp.searchsorted(qsl[1:], tok, side="right").astype(jnp.int32)  # B for padding tokens
    valid = tok < qsl[-1]
    seq = jnp.where(valid, seq, -1)
    first = jnp.where(valid, qsl[jnp.clip(seq, 0, qsl.shape[0] - 2)], tok)  # each token's sequence start
    reach = jnp.arange(nt, dtype=jnp.int32) - first[::tile] // tile  # tiles back to the sequence start
    num_steps = jnp.max(reach, initial=0) + 1

    q_IQKGH = _pad_tokens(q_TNH, tp, valid).reshape(nt, tile, kh, g, h) * sm_scale
    # Key tiles, preceded by nt empty ones so that a shift by d is one contiguous slice.
    k_IKH, v_IKH = (jnp.concatenate([jnp.zeros((tp, kh, h), jnp.float32), _pad_tokens(x, tp, valid)])
                    .reshape(2 * nt, tile, kh, h) for x in (k_TKH, v_TKH))
    seq_k = jnp.concatenate([jnp.full((tp,), -2, jnp.int32), seq]).reshape(2 * nt, tile)
    body = functools.partial(_attend_tiles, q_IQKGH=q_IQKGH, k_IKH=k_IKH, v_IKH=v_IKH, seq_q=seq.reshape(nt, tile),
                             seq_k=seq_k)
    init = (
        jnp.full((nt, kh, g, tile), -jnp.inf, jnp.float32),
        jnp.zeros((nt, kh, g, tile), jnp.float32),
        jnp.zeros((nt, kh, g, tile, h), jnp.float32),
    )
    m, l_f, acc = jax.lax.fori_loop(0, num_steps, body, init)
    m = m.transpose(0, 3, 1, 2).reshape(tp, kh, g)[:t]
    l_f = l_f.transpose(0, 3, 1, 2).reshape(tp, kh, g)[:t]
    acc = acc.transpose(0, 3, 1, 2, 4).reshape(tp, kh, g, h)[:t]
    return m, l_f, acc


def _pad_tokens(x_T_X: jax.Array, tp: int, valid_T: jax.Array) -> jax.Array:
    """float32, padded to ``tp`` tokens; padding tokens zeroed (so 0 * NaN never reaches a sum)."""
    x = jnp.pad(x_T_X.astype(jnp.float32), ((0, tp - x_T_X.shape[0]),) + ((0, 0),) * (x_T_X.ndim - 1))
    return jnp.where(valid_T.reshape((tp,) + (1,) * (x.ndim - 1)), x, 0.0)


def _attend_tiles(
    d: jax.Array,
    carry: tuple[jax.Array, jax.Array, jax.Array],
    *,
    q_IQKGH: jax.Array,
    k_IKH: jax.Array,
    v_IKH: jax.Array,
    seq_q: jax.Array,
    seq_k: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One online-softmax step: every query tile i against key tile i - d (empty where i < d)."""
    m_i, l_i, acc = carry
    nt, tile = seq_q.shape
    k = jax.lax.dynamic_slice_in_dim(k_IKH, nt - d, nt)
    v = jax.lax.dynamic_slice_in_dim(v_IKH, nt - d, nt)
    sk = jax.lax.dynamic_slice_in_dim(seq_k, nt - d, nt)
    pos = jnp.arange(tile, dtype=jnp.int32)
    # Same sequence (padding: -1 never meets a real key, -2 marks the empty tiles), causal on the diagonal.
    mask = (seq_q[:, :, None] == sk[:, None, :]) & (seq_q[:, :, None] >= 0)
    mask &= (d > 0) | (pos[None, :, None] >= pos[None, None, :])  # [I, Q, C]
    s = jnp.einsum("iqkgh,ickh->ikgqc", q_IQKGH, k)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(jnp.where(jnp.isfinite(m_i), m_i, m_safe) - m_safe)
    l_new = alpha * l_i + jnp.sum(p, axis=-1)
    acc_new = alpha[..., None] * acc + jnp.einsum("ikgqc,ickh->ikgqh", p, v)
    return m_new, l_new, acc_new
