"""Pure-jnp ragged paged attention: the semantics every kernel must match.

Also the CPU serving path, so it is written to be reasonably fast there: queries are processed
in rows (see ``metadata.py``), KV is gathered page-wise in chunks of ``kv_chunk`` tokens with an
online softmax, and the loop runs only as far as the longest sequence in the batch (a dynamic
trip count, so the block-table width does not enter the cost).

Shape letters: T tokens, N query heads, K KV heads, G = N // K, H head dim, P pages,
S page size, B sequences, W pages per sequence, R rows, Q queries per row, C KV chunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import RaggedMetadata

DEFAULT_KV_CHUNK = 128


def validate_inputs(
    q_TNH: jax.Array,
    k_pages_PSKH: jax.Array,
    v_pages_PSKH: jax.Array,
    meta: RaggedMetadata,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> None:
    """Shape and option checks shared by the reference and the kernels (trace-time, static shapes)."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be positive, got {soft_cap}")
    if q_TNH.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q_TNH.shape}")
    if k_pages_PSKH.ndim != 4 or k_pages_PSKH.shape != v_pages_PSKH.shape:
        raise ValueError(
            f"k/v pages must both be [P, S, K, H], got {k_pages_PSKH.shape} and {v_pages_PSKH.shape}"
        )
    t, n, h = q_TNH.shape
    _, _, k, hk = k_pages_PSKH.shape
    if hk != h:
        raise ValueError(f"head_dim mismatch: q has {h}, kv pages have {hk}")
    if n % k:
        raise ValueError(f"query heads ({n}) must be a multiple of KV heads ({k})")
    if meta.slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping must be [T={t}], got {meta.slot_mapping.shape}")
    b = meta.seq_lens.shape[0]
    if meta.query_start_loc.shape != (b + 1,) or meta.block_tables.shape[0] != b:
        raise ValueError("query_start_loc must be [B+1] and block_tables [B, W] with B = len(seq_lens)")
    if not (meta.row_seq.shape == meta.row_q_start.shape == meta.row_q_len.shape):
        raise ValueError("row_seq, row_q_start and row_q_len must have the same shape [R]")
    if meta.row_width < 1:
        raise ValueError(f"row_width must be >= 1, got {meta.row_width}")


def pad_block_table(bt_BW: jax.Array, pages_per_block: int) -> jax.Array:
    """Pads the table to whole blocks of pages, so every block's slice stays in bounds (no clamping)."""
    w = bt_BW.shape[1]
    wp = -(-w // pages_per_block) * pages_per_block
    return bt_BW if wp == w else jnp.pad(bt_BW, ((0, 0), (0, wp - w)))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Per-row views of the metadata, shared by the reference and the kernel wrapper."""

    q_idx: jax.Array  # i32[R, Q] flat token of each query slot (0 where invalid)
    q_valid: jax.Array  # bool[R, Q]
    q_pos: jax.Array  # i32[R, Q] absolute position of each query (-1 where invalid)
    kv_len: jax.Array  # i32[R] KV length of the row's sequence
    identity: bool  # decode layout: one query per row and row i is token i (no gather/scatter)


def row_layout(meta: RaggedMetadata, num_tokens: int) -> RowLayout:
    """Queries of each row and their positions: a row's sequence ends at ``seq_lens``, and its
    new tokens are the last ``q_len`` positions."""
    qw = meta.row_width
    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]  # [B]
    kv_len = meta.seq_lens[meta.row_seq]  # [R]
    qi = jnp.arange(qw, dtype=jnp.int32)
    q_valid = qi[None, :] < meta.row_q_len[:, None]
    q_idx = jnp.where(q_valid, meta.row_q_start[:, None] + qi[None, :], 0)
    seq_first_q = meta.query_start_loc[meta.row_seq]
    q_pos = kv_len[:, None] - q_lens[meta.row_seq][:, None] + (q_idx - seq_first_q[:, None])
    q_pos = jnp.where(q_valid, q_pos, -1)
    identity = qw == 1 and q_idx.shape[0] == num_tokens
    return RowLayout(q_idx, q_valid, q_pos, kv_len, identity)


def gather_rows(x_TNH: jax.Array, rows: RowLayout) -> jax.Array:
    """[T, N, H] -> [R, Q, N, H]."""
    if rows.identity:
        return x_TNH[:, None]
    return x_TNH[rows.q_idx]


def scatter_rows(o_RQNH: jax.Array, rows: RowLayout, num_tokens: int) -> jax.Array:
    """[R, Q, N, H] -> [T, N, H]; invalid query slots dropped, tokens without a row are zero."""
    r, qw, n, h = o_RQNH.shape
    if rows.identity:
        return jnp.where(rows.q_valid.reshape(r, 1, 1), o_RQNH.reshape(r, n, h), 0)
    dest = jnp.where(rows.q_valid, rows.q_idx, num_tokens)  # out-of-range index: dropped
    out = jnp.zeros((num_tokens, n, h), o_RQNH.dtype)
    return out.at[dest.reshape(-1)].set(o_RQNH.reshape(r * qw, n, h), mode="drop")


def ref_ragged_paged_attention(
    q_TNH: jax.Array,
    k_pages_PSKH: jax.Array,
    v_pages_PSKH: jax.Array,
    meta: RaggedMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kv_chunk: int = DEFAULT_KV_CHUNK,
) -> jax.Array:
    """Causal attention of each sequence's new queries over its cached KV (new tokens included).

    Args:
      q_TNH: [T, N, H] queries of all sequences, concatenated.
      k_pages_PSKH, v_pages_PSKH: [P, S, K, H] paged cache, already holding this step's K/V.
      meta: batch layout; see ``metadata.py``.
      sm_scale: softmax scale (usually H ** -0.5).
      sliding_window: a query at position p sees keys in (p - sliding_window, p]; None: all.
      soft_cap: logits become soft_cap * tanh(logits / soft_cap) (Gemma 2); None: off.
      kv_chunk: KV tokens processed per loop iteration (rounded up to whole pages).
    Returns:
      [T, N, H] in q's dtype; rows of padding tokens are zero.
    """
    validate_inputs(q_TNH, k_pages_PSKH, v_pages_PSKH, meta, sliding_window, soft_cap)
    q_TNH, k_pages_PSKH, v_pages_PSKH = map(jnp.asarray, (q_TNH, k_pages_PSKH, v_pages_PSKH))
    t, n, h = q_TNH.shape
    _, page, kh, _ = k_pages_PSKH.shape
    g = n // kh
    qw = meta.row_width
    pages_per_chunk = max(1, -(-kv_chunk // page))
    c = pages_per_chunk * page

    rows = row_layout(meta, t)
    row_bt = pad_block_table(meta.block_tables, pages_per_chunk)[meta.row_seq]  # [R, Wp]
    r = rows.q_pos.shape[0]
    q_RQKGH = gather_rows(q_TNH, rows).reshape(r, qw, kh, g, h).astype(jnp.float32) * sm_scale

    num_chunks = (jnp.max(rows.kv_len, initial=0) + c - 1) // c
    body = functools.partial(
        _attend_chunk, q_RQKGH=q_RQKGH, k_pages_PSKH=k_pages_PSKH, v_pages_PSKH=v_pages_PSKH, row_bt=row_bt,
        rows=rows, pages_per_chunk=pages_per_chunk, sliding_window=sliding_window, soft_cap=soft_cap,
    )
    init = (
        jnp.full((r, kh, g, qw), -jnp.inf, jnp.float32),
        jnp.zeros((r, kh, g, qw), jnp.float32),
        jnp.zeros((r, kh, g, qw, h), jnp.float32),
    )
    _, l_f, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(l_f > 0, l_f, 1.0)[..., None]  # [R, K, G, Q, H]
    out_RQNH = out.transpose(0, 3, 1, 2, 4).reshape(r, qw, n, h).astype(q_TNH.dtype)
    return scatter_rows(out_RQNH, rows, t)


def _attend_chunk(
    ci: jax.Array,
    carry: tuple[jax.Array, jax.Array, jax.Array],
    *,
    q_RQKGH: jax.Array,
    k_pages_PSKH: jax.Array,
    v_pages_PSKH: jax.Array,
    row_bt: jax.Array,
    rows: RowLayout,
    pages_per_chunk: int,
    sliding_window: int | None,
    soft_cap: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One online-softmax step over KV chunk ``ci`` of every row: carry is (max, sum, acc),
    [R, K, G, Q], [R, K, G, Q], [R, K, G, Q, H], all float32."""
    m_i, l_i, acc = carry
    r, _, kh, _, h = q_RQKGH.shape
    c = pages_per_chunk * k_pages_PSKH.shape[1]
    pages = jax.lax.dynamic_slice_in_dim(row_bt, ci * pages_per_chunk, pages_per_chunk, axis=1)
    k_RCKH = k_pages_PSKH[pages].reshape(r, c, kh, h).astype(jnp.float32)
    v_RCKH = v_pages_PSKH[pages].reshape(r, c, kh, h).astype(jnp.float32)
    kv_pos = ci * c + jnp.arange(c, dtype=jnp.int32)  # [C]
    kv_valid = kv_pos[None, :] < rows.kv_len[:, None]  # [R, C]
    # Unused pages may hold anything (NaN in tests): zero them so 0 * NaN never reaches acc.
    k_RCKH = jnp.where(kv_valid[:, :, None, None], k_RCKH, 0.0)
    v_RCKH = jnp.where(kv_valid[:, :, None, None], v_RCKH, 0.0)
    s = jnp.einsum("rqkgh,rckh->rkgqc", q_RQKGH, k_RCKH)
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    mask = kv_valid[:, None, :] & (kv_pos[None, None, :] <= rows.q_pos[:, :, None])  # [R, Q, C]
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > rows.q_pos[:, :, None] - sliding_window
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(jnp.where(jnp.isfinite(m_i), m_i, m_safe) - m_safe)
    l_new = alpha * l_i + jnp.sum(p, axis=-1)
    acc_new = alpha[..., None] * acc + jnp.einsum("rkgqc,rckh->rkgqh", p, v_RCKH)
    return m_new, l_new, acc_new


def ref_attention_dense(
    q_TNH: jax.Array,
    k_TKH: jax.Array,
    v_TKH: jax.Array,
    q_pos_T: jax.Array,
    kv_pos_T: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Plain causal attention of one sequence (no paging): the oracle the paged tests use."""
    t, n, h = q_TNH.shape
    kh = k_TKH.shape[1]
    g = n // kh
    q = q_TNH.reshape(t, kh, g, h).astype(jnp.float32) * sm_scale
    s = jnp.einsum("tkgh,ckh->kgtc", q, k_TKH.astype(jnp.float32))
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    mask = kv_pos_T[None, :] <= q_pos_T[:, None]
    if sliding_window is not None:
        mask &= kv_pos_T[None, :] > q_pos_T[:, None] - sliding_window
    s = jnp.where(mask[None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("kgtc,ckh->tkgh", p, v_TKH.astype(jnp.float32))
    return o.reshape(t, n, h).astype(q_TNH.dtype)
