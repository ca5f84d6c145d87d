"""Which free KV pages a sequence gets: consecutive runs where possible, within approximate LRU.

The CPU decode kernel reads a sequence's pages in block-table order; consecutive page ids make that
one forward stream, and the kernel alone 1.5x faster than on scattered ones (served 64-row steps
did not show it beyond the noise: docs/benchmarks.md §15, "Block placement"). Taking pages from
the LRU front alone interleaves concurrently growing sequences, so almost no neighbouring entries
are adjacent. This policy:

- grows a sequence into ``last + 1, last + 2, ...`` while those pages are free and hold no
  prefix-cache entry, or, when no uncached page is free at all, hold an *old* one;
- otherwise starts a new run: the first run long enough for the request plus ``RUN_GAP`` pages,
  beginning ``RUN_GAP`` pages after a page that is some sequence's last one, so that sequence can
  still grow in place; among uncached pages first, then uncached or old cached ones; failing that,
  the longest uncached run, then the longest old cached one; failing that, the LRU front (the
  caller's).

*Old*: a free cached page freed in the older half of the time since the oldest free cached page
was freed. So a cached page freed recently is not evicted while older ones are free: LRU order up
to a factor of two in age, instead of exactly, and uncached pages before any cached one.
Plain numpy, no jax. Page 0 (the null block) is never free here.
"""

from __future__ import annotations

import numpy as np

RUN_GAP = 16  # pages left after another sequence's last page for it to grow into (256 tokens at 16)


class BlockPlacement:
    """Per-page state the choice needs: free, cached, when freed, and whether it ends a sequence."""

    def __init__(self, num_blocks: int) -> None:
        self.free = np.zeros(num_blocks, bool)
        self.free[1:] = True
        self.cached = np.zeros(num_blocks, bool)
        self.freed_at = np.zeros(num_blocks, np.int64)  # clock value when last freed (0: never used)
        self.tail = np.zeros(num_blocks, bool)  # the last page of a live sequence
        self.clock = 0

    def release(self, bid: int) -> None:
        """``bid`` went back to the free list (at the LRU back)."""
        self.clock += 1
        self.free[bid] = True
        self.freed_at[bid] = self.clock
        self.tail[bid] = False

    def _old_cached(self) -> np.ndarray:
        """Free cached pages freed in the older half of the time since the oldest of them was."""
        free_cached = self.free & self.cached
        if not free_cached.any():
            return free_cached
        oldest = int(self.freed_at[free_cached].min())
        return free_cached & (self.freed_at <= (oldest + self.clock) // 2)

    def grow(self, last: int, n: int) -> list[int]:
        """Up to ``n`` free pages ``last + 1, last + 2, ...``: uncached ones, or old cached ones when
        no uncached page is free (stops at the first that is not)."""
        out: list[int] = []
        bid = last + 1
        old: np.ndarray | None = None
        while len(out) < n and bid < len(self.free) and self.free[bid]:
            if self.cached[bid]:
                if old is None:
                    old = self._old_cached() if not (self.free & ~self.cached).any() else np.zeros_like(self.free)
                if not old[bid]:
                    break
            out.append(bid)
            bid += 1
        return out

    def new_run(self, n: int) -> list[int]:
        """Up to ``n`` consecutive pages at the start of a new run (empty: none eligible).

        Runs of pages without a cache entry come first, so a run evicts nothing when it can."""
        uncached = self.free & ~self.cached
        run = self._roomy_run(uncached, n)
        if run:
            return run
        old = self._old_cached()
        return self._roomy_run(uncached | old, n) or self._longest_run(uncached, n) or self._longest_run(old, n)

    def _runs(self, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Maximal runs of ``ok`` pages: starts, ends (exclusive), each start's offset from a tail."""
        edges = np.flatnonzero(np.diff(np.concatenate(([0], ok.view(np.int8), [0]))))
        starts, ends = edges[0::2], edges[1::2]
        return starts, ends, np.where(self.tail[starts - 1], RUN_GAP, 0)  # starts >= 1: page 0 is never free

    def _roomy_run(self, ok: np.ndarray, n: int) -> list[int]:
        """``n`` pages of the first run with room for them plus ``RUN_GAP`` on both sides of a tail."""
        starts, ends, offset = self._runs(ok)
        roomy = np.flatnonzero(starts + offset + n + RUN_GAP <= ends)
        if not len(roomy):
            return []
        start = int(starts[roomy[0]] + offset[roomy[0]])
        return list(range(start, start + n))

    def _longest_run(self, ok: np.ndarray, n: int) -> list[int]:
        """Up to ``n`` pages of the longest run, half its spare room (at most ``RUN_GAP``) after a tail."""
        starts, ends, offset = self._runs(ok)
        if not len(starts):
            return []
        i = int(np.argmax(ends - starts))
        spare = int(ends[i] - starts[i]) - n
        start = int(starts[i]) + (min(int(offset[i]), spare // 2) if spare > 0 else 0)
        return list(range(start, min(start + n, int(ends[i]))))
