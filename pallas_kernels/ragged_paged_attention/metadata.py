"""Attention metadata for a flat ragged batch over a paged KV cache.

One step's tokens are concatenated: sequence ``b`` owns the flat query tokens
``query_start_loc[b] : query_start_loc[b + 1]``, which are the *last* ``q_len`` tokens of its
``seq_lens[b]`` KV positions (so query ``i`` of ``b`` sits at position
``seq_lens[b] - q_len + i`` and attends causally to positions ``<= `` that). Its KV lives in
the pages ``block_tables[b, :ceil(seq_lens[b] / page_size)]``.

The *row* view tiles every sequence's queries into rows of at most ``Q = row_width`` tokens
(a static field: part of the pytree structure, so part of the compile key).
Decode-only batches use ``Q = 1`` (one row per sequence); mixed batches use a larger ``Q``.
Kernels that tile queries the same way consume rows; others use the per-sequence arrays.

Padding conventions (so every array has a bucketed, static shape):
- padded sequences have ``q_len == 0`` and ``seq_lens == 0``;
- padded tokens write their K/V into page 0, which the block manager never hands out;
- padded rows have ``row_q_len == 0``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass
class AttentionMetadata:
    """Device arrays describing one step's ragged batch (a pytree; every field is data).

    Shapes: T tokens, B sequences, W pages per sequence (block-table width), R rows.
    """

    slot_mapping: jax.Array  # i32[T]   flat cache slot (page * page_size + offset) of each new token
    query_start_loc: jax.Array  # i32[B+1] cumulative query offsets into the flat tokens
    seq_lens: jax.Array  # i32[B]   KV length of each sequence after this step (0 = padding)
    block_tables: jax.Array  # i32[B, W] page ids per sequence (unused entries: 0)
    row_seq: jax.Array  # i32[R]   sequence index of each query row
    row_q_start: jax.Array  # i32[R]   flat index of the row's first query token
    row_q_len: jax.Array  # i32[R]   number of valid queries in the row (0 = padding row)
    row_width: int  # Q: static queries per row (part of the pytree structure, so of the jit key)


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=[f.name for f in dataclasses.fields(AttentionMetadata) if f.name != "row_width"],
    meta_fields=["row_width"],
)


@dataclasses.dataclass(frozen=True)
class HostAttentionMetadata:
    """The same arrays as numpy, built by the model runner before transfer."""

    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    row_seq: np.ndarray
    row_q_start: np.ndarray
    row_q_len: np.ndarray
    row_width: int

    def as_metadata(self) -> AttentionMetadata:
        return AttentionMetadata(**dataclasses.asdict(self))


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
) -> HostAttentionMetadata:
    """Pack per-sequence lengths and page lists into padded metadata arrays.

    ``q_lens[b]`` new tokens of sequence ``b`` are its last positions ``seq_lens[b] - q_lens[b]
    .. seq_lens[b] - 1``. Raises ValueError when the batch does not fit the given static sizes.
    """
    n = len(q_lens)
    if not (len(seq_lens) == len(block_tables) == n):
        raise ValueError("q_lens, seq_lens and block_tables must have one entry per sequence")
    if n > num_seqs:
        raise ValueError(f"{n} sequences do not fit num_seqs={num_seqs}")
    total = int(sum(q_lens))
    if total > num_tokens:
        raise ValueError(f"{total} tokens do not fit num_tokens={num_tokens}")
    slot_mapping = np.zeros(num_tokens, np.int32)
    qsl = np.zeros(num_seqs + 1, np.int32)
    sl = np.zeros(num_seqs, np.int32)
    bt = np.zeros((num_seqs, table_width), np.int32)
    row_seq = np.zeros(num_rows, np.int32)
    row_q_start = np.zeros(num_rows, np.int32)
    row_q_len = np.zeros(num_rows, np.int32)
    t = 0
    r = 0
    for b in range(n):
        q, s, pages = int(q_lens[b]), int(seq_lens[b]), block_tables[b]
        if q > s:
            raise ValueError(f"sequence {b}: q_len {q} exceeds seq_len {s}")
        need = -(-s // page_size)
        if need > len(pages) or need > table_width:
            raise ValueError(f"sequence {b}: {s} positions need {need} pages, has {len(pages)}")
        bt[b, :need] = pages[:need]
        sl[b] = s
        qsl[b + 1] = qsl[b] + q
        if q:
            pos = np.arange(s - q, s)
            page_ids = np.asarray(pages, np.int64)[pos // page_size]
            slot_mapping[t : t + q] = page_ids * page_size + pos % page_size
        for start in range(0, q, row_width):
            if r >= num_rows:
                raise ValueError(f"batch needs more than num_rows={num_rows} rows")
            row_seq[r] = b
            row_q_start[r] = t + start
            row_q_len[r] = min(row_width, q - start)
            r += 1
        t += q
    qsl[n + 1 :] = qsl[n]
    return HostAttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=qsl,
        seq_lens=sl,
        block_tables=bt,
        row_seq=row_seq,
        row_q_start=row_q_start,
        row_q_len=row_q_len,
        row_width=row_width,
    )
