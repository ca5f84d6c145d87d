"""``--gpu-memory-utilization`` is a fraction of the card, whatever share of it XLA's pool holds."""

from __future__ import annotations

import pytest

from jaxserve.config import ServeConfig
from jaxserve.engine import kv_cache_size
from jaxserve.engine.kv_cache_size import XLA_POOL_ENV, device_budget_bytes, num_kv_blocks, reserve_device_memory

CARD = 100 << 30


@pytest.mark.parametrize(
    ("pool_env", "utilization", "expected_fraction"),
    [
        (None, 0.5, 0.5),  # jax's default pool (75 % of the card): half the card, not half the pool
        (None, 0.9, 0.75),  # more than the pool holds: the pool
        ("0.9", 0.9, 0.9),  # the server sized the pool to the request
        ("0.5", 0.9, 0.5),  # a user's smaller pool wins
    ],
)
def test_budget_is_a_fraction_of_the_card(monkeypatch, pool_env, utilization, expected_fraction):
    if pool_env is None:
        monkeypatch.delenv(XLA_POOL_ENV, raising=False)
    else:
        monkeypatch.setenv(XLA_POOL_ENV, pool_env)
    pool = int(CARD * float(pool_env or 0.75))
    got = device_budget_bytes(ServeConfig(model="unused", gpu_memory_utilization=utilization), pool)
    assert got == pytest.approx(expected_fraction * CARD, rel=1e-6)


def test_reserve_sets_the_pool_unless_the_user_did(monkeypatch):
    monkeypatch.delenv(XLA_POOL_ENV, raising=False)
    reserve_device_memory(0.8)
    import os

    assert os.environ[XLA_POOL_ENV] == "0.8"
    reserve_device_memory(0.3)
    assert os.environ[XLA_POOL_ENV] == "0.8"


def _fake_loaded(weights: int):
    """A model whose KV block takes 1 MiB (16 tokens) and whose step reserve is the 256 MiB floor."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    config = SimpleNamespace(num_layers=32, num_kv_heads=2, head_dim=128, hidden_size=64, intermediate_size=64,
                             num_heads=2, vocab_size=1000)
    return SimpleNamespace(config=config, compute_dtype=jnp.float32, dtype=jnp.float32,
                           plan=SimpleNamespace(tp=1), weights=weights)


def test_each_model_pays_its_own_share(monkeypatch):
    """Two models in one process on a fake 100 GiB card, pool 0.9: the second model's budget is its own
    share minus its own weights, whatever the first one took (and never more than the pool has left)."""
    gib = 1 << 30
    monkeypatch.setenv(XLA_POOL_ENV, "0.9")
    limit = int(0.9 * CARD)
    in_use = {"now": 0}
    monkeypatch.setattr(kv_cache_size, "device_stats", lambda: {"bytes_limit": limit, "bytes_in_use": in_use["now"]})
    block = 1 << 20
    reserve = 256 << 20

    def blocks(share: float, weights: int) -> int:
        before = in_use["now"]
        in_use["now"] += weights
        config = ServeConfig(model="m", gpu_memory_utilization=share, block_size=16)
        n = num_kv_blocks(config, _fake_loaded(weights), 64, "gpu", in_use_before=before)
        in_use["now"] += n * block
        return n

    assert blocks(0.6, 10 * gib) == (60 * gib - 10 * gib - reserve) // block
    assert blocks(0.3, 2 * gib) == (30 * gib - 2 * gib - reserve) // block  # not 30 GiB minus everything in use
    assert in_use["now"] <= limit
    left = limit - in_use["now"]  # half a GiB
    assert blocks(0.3, 0) == (left - reserve) // block  # a share larger than what the pool has left: what is left
