"""KV-cache pages: who owns which block (plain Python, no jax).

Block 0 is the *null block*: never handed out, it absorbs the K/V writes of padding tokens and
fills unused block-table entries. Blocks ``1 .. num_blocks - 1`` are allocated on demand as a
sequence grows and returned when it finishes or is preempted.
"""

from __future__ import annotations

from collections import deque

from jaxserve.request import Request

NULL_BLOCK = 0


class BlockManager:
    """Free list of KV blocks and the per-request block lists."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, req: Request, num_new_tokens: int) -> int:
        """Blocks ``req`` must gain to hold KV for ``num_computed_tokens + num_new_tokens`` positions."""
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens)
        return max(0, need - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(req, num_new_tokens) <= len(self._free)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Grow ``req.block_ids`` to cover its next ``num_new_tokens`` positions."""
        n = self.num_new_blocks(req, num_new_tokens)
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {n}, {len(self._free)} free")
        for _ in range(n):
            req.block_ids.append(self._free.popleft())

    def free(self, req: Request) -> None:
        """Return all of ``req``'s blocks (most recently allocated first, so they are reused last)."""
        for b in reversed(req.block_ids):
            self._free.append(b)
        req.block_ids = []
