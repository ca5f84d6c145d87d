"""The fused q/k/v layout: gather indices, loader runs and the model's split agree with a layout
built head by head from its definition ([q_0 k_0 v_0 | q_1 k_1 v_1 | ...], KV heads repeated)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.qkv_layout import QKVLayout

CASES = [(4, 2, 3, 1, 1), (4, 2, 3, 2, 1), (4, 2, 3, 4, 2), (8, 1, 2, 4, 4), (6, 6, 5, 3, 1)]


def _by_heads(n: int, k: int, h: int, tp: int, r: int) -> np.ndarray:
    """Checkpoint rows of each served row, written out head by head."""
    q_heads = [np.arange(i * h, (i + 1) * h) for i in range(n)]
    k_heads = [n * h + np.arange(j // r * h, (j // r + 1) * h) for j in range(k * r)]
    v_heads = [(n + k) * h + np.arange(j // r * h, (j // r + 1) * h) for j in range(k * r)]
    out = []
    for s in range(tp):
        for heads in (q_heads, k_heads, v_heads):
            per = len(heads) // tp
            out += heads[s * per : (s + 1) * per]
    return np.concatenate(out)


@pytest.mark.parametrize("n,k,h,tp,r", CASES)
def test_fused_rows_match_the_definition(n, k, h, tp, r):
    layout = QKVLayout(n, k * r, h, tp, r)
    want = _by_heads(n, k, h, tp, r)
    assert layout.num_features == len(want)
    np.testing.assert_array_equal(layout.fused_rows(), want)


@pytest.mark.parametrize("n,k,h,tp,r", CASES)
@pytest.mark.parametrize("cut", [(0, None), (3, -2), (5, 6)])
def test_checkpoint_runs_cover_any_row_slice(n, k, h, tp, r, cut):
    layout = QKVLayout(n, k * r, h, tp, r)
    rows = slice(*cut)
    starts = np.cumsum((0, *layout.checkpoint_widths[:2]))
    runs = layout.checkpoint_rows(rows)
    got = np.concatenate([starts[part] + src for part, src in runs])
    np.testing.assert_array_equal(got, _by_heads(n, k, h, tp, r)[rows])
    assert all(runs[i][0] != runs[i + 1][0] for i in range(len(runs) - 1))  # maximal runs


@pytest.mark.parametrize("n,k,h,tp,r", CASES)
def test_split_returns_each_heads_features(n, k, h, tp, r):
    layout = QKVLayout(n, k * r, h, tp, r)
    one_device = np.random.RandomState(0).randn(2, (n + 2 * k) * h).astype(np.float32)  # [T, checkpoint F]
    q, kk, v = layout.split(jnp.asarray(one_device[:, layout.fused_rows()]))
    np.testing.assert_array_equal(np.asarray(q), one_device[:, : n * h].reshape(2, n, h))
    want_k = np.repeat(one_device[:, n * h : (n + k) * h].reshape(2, k, h), r, axis=1)
    want_v = np.repeat(one_device[:, (n + k) * h :].reshape(2, k, h), r, axis=1)
    np.testing.assert_array_equal(np.asarray(kk), want_k)
    np.testing.assert_array_equal(np.asarray(v), want_v)
