"""Block manager: allocation covers a sequence's positions, block 0 is never handed out, frees are complete."""

from __future__ import annotations

import pytest

from jaxserve.engine.block_manager import NULL_BLOCK, BlockManager
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams


def _req(n: int, rid: str = "r") -> Request:
    return Request(rid, list(range(3, 3 + n)), SamplingParams(), max_tokens=8)


def test_allocates_whole_blocks_for_positions():
    bm = BlockManager(num_blocks=10, block_size=4)
    r = _req(9)
    assert bm.num_new_blocks(r, 9) == 3
    bm.allocate(r, 9)
    assert len(r.block_ids) == 3 and NULL_BLOCK not in r.block_ids
    r.num_computed_tokens = 9
    assert bm.num_new_blocks(r, 3) == 0  # positions 9..11 fit the third block
    assert bm.num_new_blocks(r, 4) == 1
    assert bm.num_free_blocks == 6


def test_free_returns_everything_and_null_block_is_reserved():
    bm = BlockManager(num_blocks=5, block_size=2)
    a, b = _req(3, "a"), _req(4, "b")
    bm.allocate(a, 3)
    bm.allocate(b, 4)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(_req(1, "c"), 1)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(_req(1, "c"), 1)
    assert sorted(a.block_ids + b.block_ids) == [1, 2, 3, 4]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == bm.num_usable_blocks == 4 and a.block_ids == [] and b.block_ids == []


def test_rejects_tiny_caches():
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(num_blocks=1, block_size=16)
