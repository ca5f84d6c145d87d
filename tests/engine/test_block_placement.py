"""Block placement: concurrently growing sequences read consecutive pages; cache eviction stays near LRU."""

from __future__ import annotations

import numpy as np

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.block_placement import RUN_GAP
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), max_tokens=64)


def _adjacent_fraction(tables: list[list[int]]) -> float:
    pairs = [(a, b) for t in tables for a, b in zip(t, t[1:])]
    return sum(b == a + 1 for a, b in pairs) / len(pairs)


def _decode(bm: BlockManager, req: Request, n: int) -> None:
    for _ in range(n):
        bm.allocate(req, 1)
        req.num_computed_tokens += 1


def test_interleaved_growth_keeps_each_sequence_consecutive():
    """Eight sequences admitted together, then decoding one token each per step: the LRU front alone
    would hand them interleaved pages (no neighbouring entries adjacent)."""
    bm = BlockManager(400, 4)
    reqs = [_req(f"r{i}", list(range(3, 12))) for i in range(8)]
    for r in reqs:
        bm.allocate(r, 9)
        r.num_computed_tokens = 9
    for _ in range(40):
        for r in reqs:
            _decode(bm, r, 1)
    tables = [r.block_ids for r in reqs]
    assert all(len(t) == 13 for t in tables)
    assert _adjacent_fraction(tables) == 1.0
    assert len({b for t in tables for b in t}) == 8 * 13  # no page handed out twice


def test_steady_state_with_replacement_stays_consecutive():
    """Finished sequences are freed and replaced for many rounds (the case that scatters pages)."""
    rng = np.random.default_rng(0)
    bm = BlockManager(600, 4)
    live: list[tuple[Request, int]] = []
    for step in range(1500):
        while len(live) < 16:
            r = _req(f"s{step}-{len(live)}", list(range(3, 3 + int(rng.integers(4, 30)))))
            bm.allocate(r, r.num_tokens)
            r.num_computed_tokens = r.num_tokens
            live.append((r, int(rng.integers(8, 80))))
        for i, (r, left) in enumerate(live):
            _decode(bm, r, 1)
            live[i] = (r, left - 1)
        for r, left in [x for x in live if x[1] == 0]:
            bm.free(r)
        live = [x for x in live if x[1] > 0]
    assert _adjacent_fraction([r.block_ids for r, _ in live]) > 0.95


def test_a_recently_freed_cached_block_is_not_evicted_while_older_ones_are_free():
    """Every free page is cached: a new run comes out of the older half (by time freed)."""
    n = 4 * RUN_GAP
    bm = BlockManager(1 + n, 4, enable_prefix_caching=True)
    a = _req("a", list(range(100, 100 + 4 * n)))
    bm.allocate(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    bm.register_full_blocks(a, a.num_tokens)
    pages = list(a.block_ids)
    bm.free(a)  # tail first: pages[-1] is the oldest free page, pages[0] the newest
    assert bm.num_free_blocks == bm.num_cached_blocks == n
    b = _req("b", list(range(5000, 5000 + 4 * 8)))
    bm.allocate(b, b.num_tokens)
    newer_half = set(pages[: n // 2])
    assert not newer_half & set(b.block_ids)
    assert _adjacent_fraction([b.block_ids]) == 1.0
    assert len(bm.match_prefix(_req("q", list(range(100, 100 + 4 * n)) + [1]))) >= n // 2


def test_pages_without_a_cache_entry_are_taken_before_cached_ones():
    """The LRU front holds cached pages, uncached ones were freed later: a new run takes the latter."""
    bm = BlockManager(1 + RUN_GAP + 24, 4, enable_prefix_caching=True)
    cached = _req("c", list(range(100, 100 + 4 * RUN_GAP)))  # RUN_GAP full blocks
    bm.allocate(cached, cached.num_tokens)
    cached.num_computed_tokens = cached.num_tokens
    bm.register_full_blocks(cached, cached.num_tokens)
    scratch = _req("x", list(range(7000, 7000 + 4 * 24)))  # never registered: no cache entries
    bm.allocate(scratch, scratch.num_tokens)
    bm.free(cached)
    bm.free(scratch)
    r = _req("r", list(range(9000, 9000 + 4 * 4)))
    bm.allocate(r, r.num_tokens)
    assert bm.num_cached_blocks == RUN_GAP  # nothing evicted
    assert _adjacent_fraction([r.block_ids]) == 1.0
