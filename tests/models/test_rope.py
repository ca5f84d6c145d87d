"""RoPE (``layers.apply_rope``) against HF's rotate-half formula computed in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.config import RopeScaling
from jaxserve.models.layers import apply_rope, rope_inv_freq


def hf_rope(x_TNH: np.ndarray, positions_T: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF's ``x * cos + rotate_half(x) * sin`` (GPT-NeoX layout) in float64."""
    freqs = positions_T.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    half = x_TNH.shape[-1] // 2
    rotated = np.concatenate([-x_TNH[..., half:], x_TNH[..., :half]], axis=-1)
    return x_TNH * np.cos(emb) + rotated * np.sin(emb)


@pytest.mark.parametrize("heads,head_dim", [(3, 64), (2, 128), (5, 16)])
def test_apply_rope_matches_hf_formula(heads: int, head_dim: int) -> None:
    rng = np.random.default_rng(heads)
    x = rng.standard_normal((7, heads, head_dim)).astype(np.float32)
    positions = np.array([0, 1, 5, 17, 300, 2047, 9], np.int32)
    inv = rope_inv_freq(head_dim, 10000.0, RopeScaling())
    got = np.asarray(jax.jit(apply_rope, static_argnums=2)(jnp.asarray(x), jnp.asarray(positions), tuple(inv)))
    want = hf_rope(x.astype(np.float64), positions, inv)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # The fixture can fail it: position 0 is the identity, every other position rotates.
    np.testing.assert_array_equal(got[0], x[0])
    assert np.abs(got[1:] - x[1:]).max() > 0.1


def test_apply_rope_bf16_rounds_like_hf() -> None:
    """bf16 activations: cos/sin are cast to x's dtype first, as HF does, and the result stays bf16."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 2, 64)), jnp.bfloat16)
    positions = jnp.asarray([3, 50, 700, 1], jnp.int32)
    inv = rope_inv_freq(64, 10000.0, RopeScaling())
    got = apply_rope(x, positions, inv)
    assert got.dtype == jnp.bfloat16
    freqs = np.asarray(positions, np.float32)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    cos, sin = jnp.asarray(np.cos(emb), jnp.bfloat16), jnp.asarray(np.sin(emb), jnp.bfloat16)
    rotated = jnp.concatenate([-x[..., 32:], x[..., :32]], axis=-1)
    want = x * cos + rotated * sin
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=0.02)
