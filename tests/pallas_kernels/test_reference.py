"""The pure-jnp ragged paged attention against a dense per-sequence oracle.

Unused pages (and unused slots of partly used pages) are NaN, so any read outside a sequence's
KV shows up in the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import build_host_metadata
from jaxserve.pallas_kernels.ragged_paged_attention.reference import (
    ref_attention_dense,
    ref_ragged_paged_attention,
    validate_inputs,
)

_ref_jit = jax.jit(ref_ragged_paged_attention, static_argnames=("sm_scale", "kv_chunk"))
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _case(q_lens, kv_lens, *, n_heads, kv_heads, head_dim, page, dtype, row_width, kv_chunk, seed=0):
    rng = np.random.RandomState(seed)
    num_pages = 1 + sum(-(-k // page) for k in kv_lens) + 3
    k_pages = np.full((num_pages, page, kv_heads, head_dim), np.nan, np.float32)
    v_pages = np.full_like(k_pages, np.nan)
    free = list(rng.permutation(np.arange(1, num_pages)))
    tables, dense = [], []
    for kv in kv_lens:
        pages = [int(free.pop()) for _ in range(-(-kv // page))]
        tables.append(pages)
        k = rng.randn(kv, kv_heads, head_dim).astype(np.float32)
        v = rng.randn(kv, kv_heads, head_dim).astype(np.float32)
        for pos in range(kv):
            k_pages[pages[pos // page], pos % page] = k[pos]
            v_pages[pages[pos // page], pos % page] = v[pos]
        dense.append((k, v))
    total = sum(q_lens)
    num_tokens = total + 5  # padding tokens
    q = rng.randn(num_tokens, n_heads, head_dim).astype(np.float32)
    rows = sum(-(-q_ // row_width) for q_ in q_lens) + 2
    meta = build_host_metadata(
        q_lens, kv_lens, tables, page, num_tokens=num_tokens, num_seqs=len(q_lens) + 2,
        table_width=max(len(t) for t in tables) + 1, num_rows=rows, row_width=row_width,
    ).as_metadata()
    got = _ref_jit(
        jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), meta,
        sm_scale=head_dim**-0.5, kv_chunk=kv_chunk,
    )
    got = np.asarray(got.astype(jnp.float32))
    start = 0
    for (k, v), ql, kv in zip(dense, q_lens, kv_lens, strict=True):
        want = ref_attention_dense(
            jnp.asarray(q[start : start + ql], dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.arange(kv - ql, kv), jnp.arange(kv), sm_scale=head_dim**-0.5,
        )
        np.testing.assert_allclose(got[start : start + ql], np.asarray(want.astype(jnp.float32)),
                                   atol=TOL[dtype], rtol=TOL[dtype])
        start += ql
    assert np.all(got[total:] == 0), "padding tokens must produce zeros"
    assert np.isfinite(got).all()


MIXES = {
    "decode_only": ([1, 1, 1, 1], [7, 16, 33, 1]),
    "prefill_only": ([20, 5], [20, 5]),
    "mixed": ([1, 12, 1, 3], [40, 12, 9, 3]),
    "chunk_after_cached_prefix": ([10, 1], [42, 64]),
    "page_multiples": ([16, 1], [32, 16]),
    "length_one": ([1], [1]),
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (14, 2)])
def test_matches_dense(mix, heads):
    q_lens, kv_lens = MIXES[mix]
    row_width = 1 if all(q == 1 for q in q_lens) else 8
    _case(q_lens, kv_lens, n_heads=heads[0], kv_heads=heads[1], head_dim=32, page=8,
          dtype=jnp.float32, row_width=row_width, kv_chunk=16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("page,head_dim,kv_chunk", [(16, 64, 256), (32, 128, 32), (8, 64, 8)])
def test_dtypes_pages_chunks(dtype, page, head_dim, kv_chunk):
    _case([1, 30, 1, 7], [70, 30, 100, 19], n_heads=8, kv_heads=2, head_dim=head_dim, page=page,
          dtype=dtype, row_width=16, kv_chunk=kv_chunk, seed=3)


def test_invalid_inputs_raise_clear_errors():
    meta = build_host_metadata([2], [2], [[1]], 8, num_tokens=4, num_seqs=1, table_width=1,
                               num_rows=1, row_width=2).as_metadata()
    k = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        validate_inputs(jnp.zeros((4, 3, 16)), k, k, meta)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        validate_inputs(jnp.zeros((4, 4, 32)), k, k, meta)
    with pytest.raises(ValueError, match="slot_mapping"):
        validate_inputs(jnp.zeros((5, 4, 16)), k, k, meta)
    with pytest.raises(ValueError, match="do not fit num_tokens"):
        build_host_metadata([5], [5], [[1]], 8, num_tokens=4, num_seqs=1, table_width=1, num_rows=2, row_width=4)
    with pytest.raises(ValueError, match="need 2 pages"):
        build_host_metadata([1], [9], [[1]], 8, num_tokens=4, num_seqs=1, table_width=2, num_rows=2, row_width=4)
