"""Kernel-side metadata for a flat ragged batch over a paged KV cache: per-sequence arrays plus the
query-row tiling this package's kernel and reference share.

One step's tokens are concatenated: sequence ``b`` owns the flat query tokens
``query_start_loc[b] : query_start_loc[b + 1]``, which are the *last* ``q_len`` tokens of its
``seq_lens[b]`` KV positions (so query ``i`` of ``b`` sits at position
``seq_lens[b] - q_len + i`` and attends causally to positions ``<=`` that). Its KV lives in
the pages ``block_tables[b, :ceil(seq_lens[b] / page_size)]``.

The *row* view tiles every sequence's queries into rows of at most ``Q = row_width`` tokens (a
static field: part of the pytree structure). ``sequence_rows`` derives the rows from the
per-sequence arrays on device, so callers pass only per-sequence data; ``build_host_metadata``
does the same for tests and benchmarks.

Padding conventions (so every array has a static shape):
- padded sequences have ``q_len == 0`` and ``seq_lens == 0``;
- padded tokens write their K/V into page 0, which the block manager never hands out;
- padded rows have ``row_q_len == 0``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class RaggedMetadata:
    """Device arrays describing one step's ragged batch (a pytree; every field but ``row_width`` is data).

    Shapes: T tokens, B sequences, W pages per sequence (block-table width), R rows.
    """

    slot_mapping: jax.Array  # i32[T]   flat cache slot (page * page_size + offset) of each new token
    query_start_loc: jax.Array  # i32[B+1] cumulative query offsets into the flat tokens
    seq_lens: jax.Array  # i32[B]   KV length of each sequence after this step (0 = padding)
    block_tables: jax.Array  # i32[B, W] page ids per sequence (unused entries: 0)
    row_seq: jax.Array  # i32[R]   sequence index of each query row
    row_q_start: jax.Array  # i32[R]   flat index of the row's first query token
    row_q_len: jax.Array  # i32[R]   number of valid queries in the row (0 = padding row)
    row_width: int  # Q: static queries per row


jax.tree_util.register_dataclass(
    RaggedMetadata,
    data_fields=[f.name for f in dataclasses.fields(RaggedMetadata) if f.name != "row_width"],
    meta_fields=["row_width"],
)


def sequence_rows(query_start_loc: jax.Array, num_rows: int, row_width: int) -> tuple[jax.Array, ...]:
    """(row_seq, row_q_start, row_q_len), each i32[num_rows]: sequence b's queries in consecutive
    rows of ``row_width``, sequences in order; rows past the last are padding (all zero).

    ``num_rows`` must hold every row (``sum(ceil(q_len / row_width))``); rows beyond it are dropped.
    """
    qsl = jnp.asarray(query_start_loc, jnp.int32)
    b = qsl.shape[0] - 1
    q_lens = qsl[1:] - qsl[:-1]
    n_rows = (q_lens + row_width - 1) // row_width
    ends = jnp.cumsum(n_rows)
    r = jnp.arange(num_rows, dtype=jnp.int32)
    valid = r < ends[-1]
    seq = jnp.where(valid, jnp.minimum(jnp.searchsorted(ends, r, side="right"), b - 1), 0).astype(jnp.int32)
    j = r - (ends[seq] - n_rows[seq])
    q_start = jnp.where(valid, qsl[seq] + j * row_width, 0)
    q_len = jnp.where(valid, jnp.minimum(row_width, q_lens[seq] - j * row_width), 0)
    return seq, q_start.astype(jnp.int32), q_len.astype(jnp.int32)


def with_rows(
    slot_mapping: jax.Array, query_start_loc: jax.Array, seq_lens: jax.Array, block_tables: jax.Array,
    *, num_rows: int, row_width: int,
) -> RaggedMetadata:
    """Per-sequence arrays plus their row tiling (computed on device)."""
    row_seq, row_q_start, row_q_len = sequence_rows(query_start_loc, num_rows, row_width)
    return RaggedMetadata(slot_mapping, query_start_loc, seq_lens, block_tables, row_seq, row_q_start, row_q_len,
                          row_width)


def pack_sequences(
    q_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    page_size: int,
    *,
    num_tokens: int,
    num_seqs: int,
    table_width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(slot_mapping i32[T], query_start_loc i32[B+1], seq_lens i32[B], block_tables i32[B, W],
    positions i32[T]) on the host.

    ``q_lens[b]`` new tokens of sequence ``b`` are its last positions ``seq_lens[b] - q_lens[b]
    .. seq_lens[b] - 1`` (``positions``, 0 for padding tokens: the model's RoPE positions too).
    Raises ValueError when the batch does not fit the given static sizes.
    """
    n = len(q_lens)
    if not (len(seq_lens) == len(block_tables) == n):
        raise ValueError("q_lens, seq_lens and block_tables must have one entry per sequence")
    if n > num_seqs:
        raise ValueError(f"{n} sequences do not fit num_seqs={num_seqs}")
    q_list, s_list = [int(q) for q in q_lens], [int(s) for s in seq_lens]
    total = sum(q_list)
    if total > num_tokens:
        raise ValueError(f"{total} tokens do not fit num_tokens={num_tokens}")
    # Checks and the block-table entries in plain Python; the per-token work in numpy, once per batch
    # (a numpy call per sequence was most of the engine's host time for metadata).
    need, flat_pages = [], []
    for b, (q, s, pages) in enumerate(zip(q_list, s_list, block_tables)):
        if q > s:
            raise ValueError(f"sequence {b}: q_len {q} exceeds seq_len {s}")
        k = -(-s // page_size)
        if k > len(pages) or k > table_width:
            raise ValueError(f"sequence {b}: {s} positions need {k} pages, has {len(pages)}")
        need.append(k)
        flat_pages.extend(pages[:k])
    slot_mapping = np.zeros(num_tokens, np.int32)
    qsl = np.zeros(num_seqs + 1, np.int32)
    sl = np.zeros(num_seqs, np.int32)
    bt = np.zeros((num_seqs, table_width), np.int32)
    positions = np.zeros(num_tokens, np.int32)
    if n == 0:
        return slot_mapping, qsl, sl, bt, positions
    need_n = np.asarray(need, np.int64)
    rows = np.repeat(np.arange(n), need_n)
    bt[rows, np.arange(rows.size) - np.repeat(np.cumsum(need_n) - need_n, need_n)] = flat_pages
    q_n, s_n = np.asarray(q_list, np.int64), np.asarray(s_list, np.int64)
    sl[:n] = s_n
    qsl[1 : n + 1] = np.cumsum(q_n)
    qsl[n + 1 :] = total
    seq = np.repeat(np.arange(n), q_n)  # each new token's sequence
    pos = np.arange(total) + np.repeat(s_n - q_n - qsl[:n], q_n)  # its position in that sequence
    slot_mapping[:total] = bt[seq, pos // page_size].astype(np.int64) * page_size + pos % page_size
    positions[:total] = pos
    return slot_mapping, qsl, sl, bt, positions


def build_host_metadata(
    q_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    page_size: int,
    *,
    num_tokens: int,
    num_seqs: int,
    table_width: int,
    num_rows: int,
    row_width: int,
) -> RaggedMetadata:
    """``pack_sequences`` plus the rows (tests and benchmarks); raises when the rows do not fit."""
    needed = sum(-(-int(q) // row_width) for q in q_lens)
    if needed > num_rows:
        raise ValueError(f"batch needs {needed} rows, more than num_rows={num_rows}")
    slots, qsl, sl, bt, _ = pack_sequences(q_lens, seq_lens, block_tables, page_size, num_tokens=num_tokens,
                                        num_seqs=num_seqs, table_width=table_width)
    meta = with_rows(slots, qsl, sl, bt, num_rows=num_rows, row_width=row_width)
    return jax.tree.map(np.asarray, meta)
