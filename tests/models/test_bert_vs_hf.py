"""all-MiniLM-L6-v2 through the embedding engine equals HF transformers' BertModel pooled as the
checkpoint's sentence-transformers files say (float32): batched with padding and one by one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.helpers import SENTENCES

pytestmark = pytest.mark.hf_reference

MIN_COSINE, MAX_ABS = 0.99999, 1e-5


def _check(ours: np.ndarray, ref: np.ndarray) -> None:
    cos = np.sum(ours * ref, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= MIN_COSINE, cos
    assert np.abs(ours - ref).max() <= MAX_ABS


@pytest.fixture(scope="module")
def reference(minilm_hf_vectors) -> np.ndarray:
    return minilm_hf_vectors


@pytest.fixture(scope="module")
def token_ids(minilm_dir) -> list[list[int]]:
    return AutoTokenizer.from_pretrained(str(minilm_dir))(SENTENCES)["input_ids"]


def test_batched_equals_hf(minilm_engine, reference, token_ids):
    assert len({len(t) for t in token_ids}) == len(token_ids)  # every row padded differently
    _check(minilm_engine.embed(token_ids), reference)


def test_one_by_one_equals_hf(minilm_engine, reference, token_ids):
    _check(np.stack([minilm_engine.embed([t])[0] for t in token_ids]), reference)


def test_tanh_gelu_or_no_padding_mask_would_fail(minilm_engine, reference, token_ids, monkeypatch):
    """The tolerances above catch the two classic mistakes (the check's twin)."""
    from flax import nnx

    from jaxserve.models.bert import pool

    enc = minilm_engine.model
    b, n = 4, 64
    ids = np.zeros((b, n), np.int32)
    mask = np.zeros((b, n), bool)
    for row, t in enumerate(token_ids[:b]):
        ids[row, : len(t)], mask[row, : len(t)] = t, True
    unmasked = pool(nnx.merge(enc.graphdef, enc.state)(jnp.asarray(ids), jnp.ones_like(mask)), jnp.asarray(mask),
                    minilm_engine.model.pooling)
    with pytest.raises(AssertionError):
        _check(np.asarray(unmasked), reference[:b])
    exact = jax.nn.gelu
    monkeypatch.setattr(jax.nn, "gelu", lambda x, approximate=True: exact(x, approximate=True))  # jax's default
    tanh = pool(nnx.merge(enc.graphdef, enc.state)(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask),
                minilm_engine.model.pooling)
    with pytest.raises(AssertionError):
        _check(np.asarray(tanh), reference[:b])
