"""Public ragged paged attention op: validation (shared with the reference), layout, kernel call.

The wrapper gathers each row's queries into ``[R, K, Q * Gp, H]`` tiles (no gather for decode
batches, where row i is token i), runs the kernel, and scatters the tiles back to ``[T, N, H]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxserve.pallas_kernels.ragged_paged_attention import kernel as _kernel
from jaxserve.pallas_kernels.ragged_paged_attention.metadata import RaggedMetadata
from jaxserve.pallas_kernels.ragged_paged_attention.reference import (
    gather_rows,
    pad_block_table,
    row_layout,
    scatter_rows,
    validate_inputs,
)

MIN_DOT_ROWS = 16  # Triton's tl.dot needs at least 16 rows


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_launch(row_width: int) -> tuple[int, int]:
    """(num_warps, num_stages) measured best on an H200 (``bench_kernels.py --sweep``, 2026-11-27):
    decode rows 4 warps / 1 stage (0.209 ms vs 0.222 with 2 stages, 7B heads, B=64, ctx 4096);
    prefill rows 8 warps / 1 stage (117 vs 63 TFLOP/s, 2048-token chunk)."""
    return (4, 1) if row_width == 1 else (8, 1)


def padded_heads_per_query(heads_per_kv: int, row_width: int) -> int:
    """Query heads per KV head padded so ``row_width * Gp`` is a power of two and >= 16."""
    gp = _next_pow2(heads_per_kv)
    while row_width * gp < MIN_DOT_ROWS or (row_width * gp) & (row_width * gp - 1):
        gp *= 2
    return gp


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "soft_cap", "kv_block_tokens", "num_warps", "num_stages", "interpret",
    ),
)
def ragged_paged_attention(
    q_TNH: jax.Array,
    k_pages_PSKH: jax.Array,
    v_pages_PSKH: jax.Array,
    meta: RaggedMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kv_block_tokens: int = 128,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as ``reference.ref_ragged_paged_attention``.

    Args:
      q_TNH: [T, N, H] bf16/f32 queries (HBM).
      k_pages_PSKH, v_pages_PSKH: [P, S, K, H] paged cache holding this step's K/V (HBM).
      meta: ``RaggedMetadata`` (query offsets, KV lengths, block tables, query rows).
      sm_scale: softmax scale; sliding_window, soft_cap: optional (Mistral, Gemma).
      kv_block_tokens: keys per inner-loop step (rounded to whole pages).
      num_warps, num_stages: Triton launch settings (default: ``default_launch(row_width)``).
      interpret: run the Pallas body with jax ops (CPU tests).
    Returns:
      [T, N, H] in q's dtype; tokens without a row are zero.
    """
    validate_inputs(q_TNH, k_pages_PSKH, v_pages_PSKH, meta, sliding_window, soft_cap)
    t, n, h = q_TNH.shape
    num_pages, page, kh, _ = k_pages_PSKH.shape
    g = n // kh
    qw = meta.row_width
    gp = padded_heads_per_query(g, qw)
    pages_per_block = max(1, kv_block_tokens // page)

    rows = row_layout(meta, t)
    r = rows.q_idx.shape[0]
    q_rows = gather_rows(q_TNH, rows).reshape(r, qw, kh, g, h)
    if gp != g:
        q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
    q_tiles = q_rows.transpose(0, 2, 1, 3, 4).reshape(r, kh, qw * gp, h)

    q_pos0 = rows.q_pos[:, 0]
    info = jnp.stack(
        [rows.kv_len, jnp.maximum(q_pos0, 0), meta.row_q_len, jnp.zeros_like(q_pos0)], axis=1
    ).astype(jnp.int32)
    info = info.at[:, 0].set(jnp.where(meta.row_q_len > 0, info[:, 0], 0))  # padding rows do nothing
    bt = pad_block_table(meta.block_tables, pages_per_block)[meta.row_seq]
    wp = bt.shape[1]

    warps, stages = default_launch(qw)
    call = _kernel.build_call(
        num_rows=r, num_kv_heads=kh, rows_per_program=qw * gp, head_dim=h, num_pages=num_pages,
        page_size=page, table_width=wp, pages_per_block=pages_per_block, heads_per_query=gp,
        out_dtype=q_TNH.dtype, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        num_warps=num_warps or warps, num_stages=num_stages or stages, interpret=interpret,
    )
    o_tiles = call(info, bt, q_tiles, k_pages_PSKH, v_pages_PSKH)  # [R, K, Q * Gp, H]
    o_rows = o_tiles.reshape(r, kh, qw, gp, h)[:, :, :, :g].transpose(0, 2, 1, 3, 4).reshape(r, qw, n, h)
    return scatter_rows(o_rows, rows, t)
