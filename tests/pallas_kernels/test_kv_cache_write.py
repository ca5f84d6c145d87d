"""The Pallas KV-cache write (interpret mode on CPU, compiled on a CUDA GPU) against the XLA scatter reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas_kernels.kv_cache_write.ops import write_kv as kernel_write_kv
from jaxserve.pallas_kernels.kv_cache_write.reference import write_kv as ref_write_kv
from tests.pallas_kernels.helpers import INTERPRET


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_kernel_matches_reference(dtype, num_tokens):
    rng = np.random.RandomState(num_tokens)
    pages = rng.randn(6, 8, 2, 16).astype(np.float32)
    k_new = rng.randn(num_tokens, 2, 16).astype(np.float32)
    v_new = rng.randn(num_tokens, 2, 16).astype(np.float32)
    slots = rng.choice(np.arange(8, 48), size=num_tokens, replace=False).astype(np.int32)  # pages 1..5
    want = ref_write_kv(jnp.asarray(pages, dtype), jnp.asarray(pages * 2, dtype), jnp.asarray(k_new),
                        jnp.asarray(v_new), jnp.asarray(slots))
    got = kernel_write_kv(jnp.asarray(pages, dtype), jnp.asarray(pages * 2, dtype), jnp.asarray(k_new),
                          jnp.asarray(v_new), jnp.asarray(slots), interpret=INTERPRET)
    for g, w in zip(got, want, strict=True):  # page 0 is the null block: scratch, contents unspecified
        np.testing.assert_array_equal(np.asarray(g[1:].astype(jnp.float32)), np.asarray(w[1:].astype(jnp.float32)))
    flat = np.asarray(got[0].astype(jnp.float32)).reshape(48, 2, 16)
    np.testing.assert_array_equal(flat[slots], np.asarray(jnp.asarray(k_new, dtype).astype(jnp.float32)))


def test_invalid_shapes():
    pages = jnp.zeros((4, 8, 2, 16))
    with pytest.raises(ValueError, match="new k/v must be"):
        kernel_write_kv(pages, pages, jnp.zeros((3, 2, 8)), jnp.zeros((3, 2, 8)), jnp.zeros(3, jnp.int32),
                        interpret=INTERPRET)
