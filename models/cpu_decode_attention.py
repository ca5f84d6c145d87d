"""Decode attention for the ``cpu`` backend: the jnp reference, run on groups of rows sorted by
context length.

On XLA:CPU the reference's cost is its page gathers, and each loop step gathers a whole KV chunk
for every row, so a decode batch pays for its longest context in every row. Sorting the rows by
context length and attending each group in its own loop (bounded by that group's longest row)
gathers less padding: at 64 rows with contexts of 20–190 tokens, 22 % less attention time
(``docs/benchmarks.md`` §15). Each row's arithmetic is the reference's, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import RaggedMetadata
from jaxserve.pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention


def grouped_decode_attention(
    q_TNH: jax.Array, k_pages_PSKH: jax.Array, v_pages_PSKH: jax.Array, rows: RaggedMetadata, *,
    sm_scale: float, groups: int,
) -> jax.Array:
    """Decode-step attention (``rows``: one query per row, row i is token i) in ``groups`` groups.

    Rows are sorted by KV length (padding rows, length 0, first); group g holds sorted rows
    ``[g * T / groups, (g + 1) * T / groups)`` and runs the reference over its own rows only.
    Returns [T, N, H] like ``ref_ragged_paged_attention``; padding rows are zero.
    """
    t = q_TNH.shape[0]
    if rows.row_width != 1 or rows.row_seq.shape[0] != t or t % groups:
        raise ValueError(f"grouped decode attention needs one query per row and {groups} equal groups, "
                         f"got {rows.row_seq.shape[0]} rows of width {rows.row_width} for {t} tokens")
    row_len = jnp.where(rows.row_q_len > 0, rows.seq_lens[rows.row_seq], 0)  # [T]
    order = jnp.argsort(row_len)
    size = t // groups
    outs = []
    for g in range(groups):
        idx = order[g * size:(g + 1) * size]
        lens = row_len[idx]
        own = jnp.arange(size, dtype=jnp.int32)
        group = RaggedMetadata(
            slot_mapping=rows.slot_mapping[idx], query_start_loc=jnp.arange(size + 1, dtype=jnp.int32),
            seq_lens=lens, block_tables=rows.block_tables[rows.row_seq[idx]], row_seq=own, row_q_start=own,
            row_q_len=(lens > 0).astype(jnp.int32), row_width=1,
        )
        outs.append(ref_ragged_paged_attention(q_TNH[idx], k_pages_PSKH, v_pages_PSKH, group, sm_scale=sm_scale))
    return jnp.concatenate(outs)[jnp.argsort(order)]
