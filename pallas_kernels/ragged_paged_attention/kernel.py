"""Pallas body of ragged paged attention (Triton backend for CUDA GPUs; interpret mode on CPU).

One program per (query row, KV head). A row holds up to Q query tokens of one sequence (Q = 1
for decode); the program attends the row's Q x G query heads (padded to ``Mp = Q * Gp`` rows so
the dots are at least 16 tall, as Triton wants) over the sequence's pages, ``pages_per_block``
pages per loop step, with an online softmax in float32. Pages are read through the row's block
table; unused slots of the last page are never trusted (their V is zeroed, their logits masked).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu  # Triton dots and compiler knobs (interpretable on CPU)

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
INFO_KV_LEN, INFO_Q_POS0, INFO_Q_LEN = 0, 1, 2  # columns of the per-row info array


def _kernel(
    info_ref: jax.Ref,  # i32[4]          (kv_len, position of the row's first query, number of queries, 0)
    bt_ref: jax.Ref,  # i32[Wp]           the row's block table (padded to whole blocks)
    q_ref: jax.Ref,  # [Mp, H]            the row's queries for this KV head: Q tokens x Gp heads
    k_ref: jax.Ref,  # [P, S, H]          this KV head's slice of the key pages
    v_ref: jax.Ref,  # [P, S, H]          this KV head's slice of the value pages
    o_ref: jax.Ref,  # [Mp, H]
    *,
    sm_scale: float,
    pages_per_block: int,
    heads_per_query: int,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    mp, h = q_ref.shape
    page = k_ref.shape[1]
    c = pages_per_block * page
    kv_len = info_ref[INFO_KV_LEN]
    q_pos0 = info_ref[INFO_Q_POS0]
    q_len = info_ref[INFO_Q_LEN]
    q = q_ref[...]
    # Triton's default for float32 dots is TF32 (~1e-3 relative error); float32 caches ask for exact.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    q_pos = q_pos0 + lax.broadcasted_iota(jnp.int32, (mp, 1), 0) // heads_per_query  # [Mp, 1]
    # Causality bounds the keys: none beyond the row's last query (or the sequence).
    hi = jnp.minimum(kv_len, q_pos0 + q_len)
    num_blocks = pl.cdiv(hi, c)
    first_block = 0
    if sliding_window is not None:
        first_block = jnp.maximum(q_pos0 - sliding_window + 1, 0) // c

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One loop step: ``pages_per_block`` pages of K/V folded into the running (o, m, l)."""
        o, m, l = carry
        pages = bt_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(c, h)
        v = v_ref[pages].reshape(c, h)
        kv_pos = i * c + lax.broadcasted_iota(jnp.int32, (1, c), 1)  # [1, C]
        in_seq = kv_pos < kv_len
        kv_pos_col = i * c + lax.broadcasted_iota(jnp.int32, (c, 1), 0)  # [C, 1]
        v = jnp.where(kv_pos_col < kv_len, v, jnp.zeros_like(v))  # unused slots may hold NaN
        s = plgpu.dot(q, k, trans_b=True, precision=precision).astype(jnp.float32) * sm_scale  # [Mp, C]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = in_seq & (kv_pos <= q_pos)
        if sliding_window is not None:
            mask = mask & (kv_pos > q_pos - sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
        return _online_softmax_update(o, m, l, s, mask, v, precision)

    init = (
        jnp.zeros((mp, h), jnp.float32),
        jnp.full((mp, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((mp, 1), jnp.float32),
    )
    o, _, l = lax.fori_loop(first_block, num_blocks, body, init)
    o_ref[...] = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def _online_softmax_update(
    o: jax.Array,  # f32[Mp, H]   unnormalised output so far
    m: jax.Array,  # f32[Mp, 1]   running max of the logits
    l: jax.Array,  # f32[Mp, 1]   running sum of exp(logit - m)
    s: jax.Array,  # f32[Mp, C]   this block's logits, MASK_VALUE where masked
    mask: jax.Array,  # bool[Mp, C]
    v: jax.Array,  # [C, H]       this block's values (unused slots zeroed)
    precision: lax.Precision | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block of the online softmax: rescale what came before to the new max, add this block."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [Mp, 1]
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    o_new = alpha * o + plgpu.dot(p.astype(v.dtype), v, precision=precision).astype(jnp.float32)
    return o_new, m_new, l_new


def build_call(
    *,
    num_rows: int,
    num_kv_heads: int,
    rows_per_program: int,
    head_dim: int,
    num_pages: int,
    page_size: int,
    table_width: int,
    pages_per_block: int,
    heads_per_query: int,
    out_dtype: jnp.dtype,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> Callable[..., jax.Array]:
    """The ``pallas_call``: grid (rows, KV heads), operands (info, block tables, q, k pages, v pages).

    Shapes: info i32[R, 4]; block tables i32[R, Wp]; q [R, K, Mp, H]; pages [P, S, K, H];
    output [R, K, Mp, H].
    """
    mp = rows_per_program
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        pages_per_block=pages_per_block,
        heads_per_query=heads_per_query,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return pl.pallas_call(
        kernel,
        grid=(num_rows, num_kv_heads),
        in_specs=[
            pl.BlockSpec((None, 4), lambda r, k: (r, 0)),
            pl.BlockSpec((None, table_width), lambda r, k: (r, 0)),
            pl.BlockSpec((None, None, mp, head_dim), lambda r, k: (r, k, 0, 0)),
            pl.BlockSpec((num_pages, page_size, None, head_dim), lambda r, k: (0, 0, k, 0)),
            pl.BlockSpec((num_pages, page_size, None, head_dim), lambda r, k: (0, 0, k, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, mp, head_dim), lambda r, k: (r, k, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_rows, num_kv_heads, mp, head_dim), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )
