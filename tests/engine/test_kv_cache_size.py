"""``--gpu-memory-utilization`` is a fraction of the card, whatever share of it XLA's pool holds."""

from __future__ import annotations

import pytest

from jaxserve.config import ServeConfig
from jaxserve.engine.kv_cache_size import XLA_POOL_ENV, device_budget_bytes, reserve_device_memory

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
