"""Attention backends against each other on CPU: the TPU backend's combined K/V layout and its
per-sequence metadata against jax's bundled TPU kernel's own jnp reference, and every backend
that runs here against the jnp reference over two steps (the second reads the first's cache)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import ref_ragged_paged_attention as bundled_ref

from jaxserve.models.attention import build_host_metadata
from jaxserve.models.attention_backends import get_backend, resolve_backend

N, K, H, PAGE = 8, 2, 128, 16
STEPS = [  # (q_lens, seq_lens): a prefill step, then decodes and a chunk on top of it
    ([1, 12, 5, 20], [1, 12, 5, 20]),
    ([1, 1, 3, 16], [2, 13, 8, 36]),
]
TABLES = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]


def run_steps(name: str) -> tuple[list[np.ndarray], object, list]:
    """Outputs of both steps, the final cache, and each step's metadata."""
    backend = get_backend(name)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), backend.cache_shapes(16, PAGE, K, H, jnp.float32))
    rng = np.random.RandomState(0)
    outs, metas = [], []
    for q_lens, seq_lens in STEPS:
        t = sum(q_lens) + 3  # padding tokens too
        meta = build_host_metadata(q_lens, seq_lens, TABLES, PAGE, num_tokens=t, num_seqs=5, table_width=4)
        q, k, v = (jnp.asarray(rng.randn(t, heads, H), jnp.float32) for heads in (N, K, K))
        o, cache = jax.jit(functools.partial(backend.forward, sm_scale=H**-0.5))(q, k, v, cache, meta)
        outs.append(np.asarray(o)[: sum(q_lens)])
        metas.append((q, meta))
    return outs, cache, metas


@pytest.mark.parametrize("name", ["tpu_split", "pallas_interpret"])
def test_backends_agree_with_the_reference(name):
    want, ref_cache, _ = run_steps("reference")
    got, cache, _ = run_steps(name)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    if name.startswith("tpu"):  # the combined layout holds the same K/V, interleaved
        np.testing.assert_array_equal(np.asarray(cache[:, :, 0::2])[1:], np.asarray(ref_cache[0])[1:])
        np.testing.assert_array_equal(np.asarray(cache[:, :, 1::2])[1:], np.asarray(ref_cache[1])[1:])


def test_tpu_layout_and_metadata_match_the_bundled_kernels_contract():
    """jax's bundled TPU kernel's jnp reference, fed our cache and metadata, gives our outputs."""
    got, cache, metas = run_steps("tpu_split")
    q, meta = metas[-1]
    n_seqs = int(np.sum(meta.seq_lens > 0))
    want = bundled_ref(q, cache, jnp.asarray(meta.seq_lens), jnp.asarray(meta.block_tables),
                       jnp.asarray(meta.query_start_loc), jnp.asarray([n_seqs], jnp.int32), sm_scale=H**-0.5)
    np.testing.assert_allclose(got[-1], np.asarray(want)[: len(got[-1])], atol=2e-5, rtol=2e-5)


def test_backend_resolution():
    assert resolve_backend("auto", "gpu") == "pallas" and resolve_backend("auto", "tpu") == "tpu"
    assert resolve_backend("auto", "cpu") == "cpu" and resolve_backend("pallas", "cpu") == "pallas_interpret"
    assert resolve_backend("reference", "cpu") == "reference" and resolve_backend("auto", "metal") == "reference"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        resolve_backend("flash", "cpu")
