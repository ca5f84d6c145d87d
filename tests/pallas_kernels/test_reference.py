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
from jaxserve.pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention, validate_inputs
from tests.pallas_kernels.helpers import MIXES, check_against_dense

_ref = jax.jit(ref_ragged_paged_attention, static_argnames=("sm_scale", "kv_chunk", "sliding_window", "soft_cap"))


def _case(q_lens, kv_lens, **kw):
    kv_chunk = kw.pop("kv_chunk")
    check_against_dense(lambda *a, **k: _ref(*a, kv_chunk=kv_chunk, **k), q_lens, kv_lens, **kw)

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


def test_sliding_window_and_soft_cap():
    _case([1, 12, 1], [40, 30, 9], n_heads=8, kv_heads=2, head_dim=32, page=8, dtype=jnp.float32,
          row_width=8, kv_chunk=16, sliding_window=7, soft_cap=2.0)


def test_invalid_inputs_raise_clear_errors():
    meta = build_host_metadata([2], [2], [[1]], 8, num_tokens=4, num_seqs=1, table_width=1,
                               num_rows=1, row_width=2)
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
