"""Prefill attention that reads this step's own K/V directly, against the paged reference and the
dense oracle: ragged packed sequences, padding tokens, cached prefixes, and tiles that sequences
cross. Unused pages are NaN (``helpers.check_against_dense``), so a stray page read shows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import build_host_metadata
from jaxserve.pallas_kernels.ragged_paged_attention.prefill_reference import ref_prefill_attention
from jaxserve.pallas_kernels.ragged_paged_attention.reference import ref_attention_dense, ref_ragged_paged_attention
from tests.pallas_kernels.helpers import MIXES, check_against_dense


@functools.partial(jax.jit, static_argnames=("sm_scale", "tile"))
def _prefill(q, k_pages, v_pages, meta, *, sm_scale, tile):
    """The new K/V as the model hands them over: read back from the slots this step wrote."""
    kv_heads, head_dim = k_pages.shape[2:]
    k = k_pages.reshape(-1, kv_heads, head_dim)[meta.slot_mapping]
    v = v_pages.reshape(-1, kv_heads, head_dim)[meta.slot_mapping]
    return ref_prefill_attention(q, k, v, k_pages, v_pages, meta, sm_scale=sm_scale, tile=tile)


_fresh = jax.jit(ref_prefill_attention, static_argnames=("sm_scale", "tile"))
_paged = jax.jit(ref_ragged_paged_attention, static_argnames=("sm_scale",))

CASES = {  # (q_lens, kv_lens, tile): tiles of 8 tokens, so most sequences cross a tile boundary
    "fresh_packed": ([3, 17, 1, 9, 30], [3, 17, 1, 9, 30], 8),
    "fresh_beside_prefixes": ([5, 19, 1, 12], [5, 40, 33, 12], 8),
    "mixed_one_tile": (*MIXES["mixed"], 64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense(case):
    q_lens, kv_lens, tile = CASES[case]
    check_against_dense(functools.partial(_prefill, tile=tile), q_lens, kv_lens, n_heads=8, kv_heads=2,
                        head_dim=32, page=8, dtype=jnp.float32, row_width=8)


def test_matches_the_paged_reference():
    """Tight agreement with the paged path over the same metadata, padding tokens included."""
    rng = np.random.RandomState(1)
    q_lens, kv_lens, page = [13, 1, 40, 6], [13, 50, 40, 22], 16
    tables = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    meta = build_host_metadata(q_lens, kv_lens, tables, page, num_tokens=64, num_seqs=6, table_width=4,
                               num_rows=12, row_width=16)
    k_pages, v_pages = (jnp.asarray(rng.randn(17, page, 2, 64), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.randn(64, 6, 64), jnp.float32)
    want = np.asarray(_paged(q, k_pages, v_pages, meta, sm_scale=0.125))
    got = np.asarray(_prefill(q, k_pages, v_pages, meta, sm_scale=0.125, tile=16))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.all(got[sum(q_lens):] == 0)


def test_fresh_sequences_read_no_page():
    """Every sequence starts at position 0: all pages NaN, the output still equals the oracle."""
    rng = np.random.RandomState(2)
    q_lens = [11, 4, 25]
    t, n, kh, h = 48, 4, 2, 16
    meta = build_host_metadata(q_lens, q_lens, [[1, 2, 3, 4, 5]] * 3, 8, num_tokens=t, num_seqs=4, table_width=5,
                               num_rows=8, row_width=8)
    q, k, v = (jnp.asarray(rng.randn(t, heads, h), jnp.float32) for heads in (n, kh, kh))
    pages = jnp.full((6, 8, kh, h), jnp.nan, jnp.float32)
    got = np.asarray(_fresh(q, k, v, pages, pages, meta, sm_scale=0.25, tile=8))
    start = 0
    for ql in q_lens:
        s = slice(start, start + ql)
        want = ref_attention_dense(q[s], k[s], v[s], jnp.arange(ql), jnp.arange(ql), sm_scale=0.25)
        np.testing.assert_allclose(got[s], np.asarray(want), atol=2e-5, rtol=2e-5)
        start += ql
    assert np.all(got[start:] == 0)
    # The twin: the same tokens read as one sequence see their neighbours, and the oracle tells.
    one = build_host_metadata([start], [start], [[1, 2, 3, 4, 5]], 8, num_tokens=t, num_seqs=4, table_width=5,
                              num_rows=8, row_width=8)
    leaky = np.asarray(_fresh(q, k, v, pages, pages, one, sm_scale=0.25, tile=8))
    assert not np.allclose(leaky[q_lens[0]:start], got[q_lens[0]:start], atol=1e-3)
