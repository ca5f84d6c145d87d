"""The Pallas ragged paged attention kernel (interpret mode on CPU, compiled on a CUDA GPU) against the dense oracle,
across dtypes, head layouts, head dims, page sizes and ragged batch mixes."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import build_host_metadata
from jaxserve.pallas_kernels.ragged_paged_attention.ops import padded_heads_per_query, ragged_paged_attention
from tests.pallas_kernels.helpers import INTERPRET, MIXES, check_against_dense

kernel = functools.partial(ragged_paged_attention, interpret=INTERPRET)

HEADS = {"mha_4_4": (4, 4), "gqa_28_4": (28, 4), "gqa_14_2": (14, 2), "gqa_32_8": (32, 8)}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("heads", list(HEADS))
def test_mixes_and_head_layouts(mix, heads):
    q_lens, kv_lens = MIXES[mix]
    n, k = HEADS[heads]
    row_width = 1 if all(q == 1 for q in q_lens) else 16
    check_against_dense(functools.partial(kernel, kv_block_tokens=32), q_lens, kv_lens, n_heads=n, kv_heads=k,
                        head_dim=64, page=16, dtype=jnp.float32, row_width=row_width)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page", [16, 32])
def test_dtypes_head_dims_pages(dtype, head_dim, page):
    check_against_dense(functools.partial(kernel, kv_block_tokens=2 * page), [1, 30, 1, 7], [70, 30, 100, 19],
                        n_heads=14, kv_heads=2, head_dim=head_dim, page=page, dtype=dtype, row_width=16, seed=3)


def test_sliding_window_and_soft_cap():
    check_against_dense(functools.partial(kernel, kv_block_tokens=16), [1, 12, 1, 20], [40, 30, 9, 70],
                        n_heads=8, kv_heads=2, head_dim=64, page=8, dtype=jnp.float32, row_width=8,
                        sliding_window=7, soft_cap=2.0)


def test_padded_heads_per_query_keeps_dots_tall_and_pow2():
    assert padded_heads_per_query(7, 1) == 16 and padded_heads_per_query(7, 16) == 8
    assert padded_heads_per_query(4, 8) == 4 and padded_heads_per_query(1, 1) == 16


def test_invalid_inputs_raise_clear_errors():
    meta = build_host_metadata([2], [2], [[1]], 8, num_tokens=4, num_seqs=1, table_width=1,
                               num_rows=1, row_width=2)
    k = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernel(jnp.zeros((4, 3, 16)), k, k, meta, sm_scale=1.0)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        kernel(jnp.zeros((4, 4, 16)), k, k, meta, sm_scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="soft_cap must be positive"):
        kernel(jnp.zeros((4, 4, 16)), k, k, meta, sm_scale=1.0, soft_cap=-1.0)
    assert np.isfinite(np.asarray(kernel(jnp.ones((4, 4, 16)), k, k, meta, sm_scale=1.0))).all()
