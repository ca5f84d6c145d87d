"""KV-cache pages: who owns which block, and (optionally) which full blocks can be shared.

Block 0 is the *null block*: never handed out, it absorbs the K/V writes of padding tokens and
fills unused block-table entries. Blocks ``1 .. num_blocks - 1`` are reference counted.

Prefix caching: a full block is identified by ``(parent's chain id, its tokens)``. The chain id is
a serial number given to each registered block and never reused, so equal keys mean equal token
prefixes exactly (no hash collisions). A sequence's first block has the parent ``-1 - lora_id``
(``-1`` for the base model): the same tokens under two LoRA adapters never share KV. Blocks whose count drops to zero go to the back of an LRU
free list but stay findable until they are handed out again (evicted).

Which free block a sequence gets is ``engine/block_placement.py``'s choice: consecutive runs per
sequence, in approximate LRU order. Plain Python and numpy, no jax.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from jaxserve.engine.block_placement import BlockPlacement
from jaxserve.request import Request

NULL_BLOCK = 0

BlockKey = tuple[int, tuple[int, ...]]


def _root(req: Request) -> int:
    """The parent key of a sequence's first block: its LoRA adapter (ids never reused), -1 for none."""
    return -1 - req.lora_id


class Block:
    __slots__ = ("block_id", "ref_count", "key", "chain_id")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.key: BlockKey | None = None  # set while the block is registered in the prefix cache
        self.chain_id = -1


class BlockManager:
    """Free list (LRU), reference counts, per-request block lists and the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))  # LRU order
        self._placement = BlockPlacement(num_blocks)
        self._cache: dict[BlockKey, int] = {}
        self._serial = itertools.count()
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cache)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, req: Request, num_new_tokens: int) -> int:
        """Blocks ``req`` must gain to hold KV for ``num_computed_tokens + num_new_tokens`` positions."""
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens)
        return max(0, need - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(req, num_new_tokens) <= len(self._free)

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, req: Request) -> list[int]:
        """Cached blocks holding ``req``'s leading tokens (at least one token is always left to compute)."""
        if not self.enable_prefix_caching or req.block_ids:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent = _root(req)
        for k in range((req.num_tokens - 1) // bs):
            bid = self._cache.get((parent, tuple(req.tokens(k * bs, (k + 1) * bs))))
            if bid is None:
                break
            hits.append(bid)
            parent = self.blocks[bid].chain_id
        return hits

    def can_admit(self, req: Request, hits: list[int], num_new_tokens: int) -> bool:
        """Whether taking ``hits`` and allocating for ``num_new_tokens`` more tokens fits."""
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        fresh = self.blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        return reused_free + fresh <= len(self._free)

    def acquire_prefix(self, req: Request, hits: list[int]) -> None:
        """Give ``req`` the cached ``hits`` and count them as computed."""
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
                self._placement.free[bid] = False
            block.ref_count += 1
            req.block_ids.append(bid)
        req.num_computed_tokens = len(hits) * self.block_size
        req.num_registered_blocks = len(hits)

    def register_full_blocks(self, req: Request, num_known_tokens: int) -> None:
        """Make ``req``'s blocks that are full of computed, known tokens findable by later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(req.num_computed_tokens, num_known_tokens) // bs
        k = req.num_registered_blocks
        parent = self.blocks[req.block_ids[k - 1]].chain_id if k else _root(req)
        while k < full:
            block = self.blocks[req.block_ids[k]]
            key = (parent, tuple(req.tokens(k * bs, (k + 1) * bs)))
            existing = self._cache.get(key)
            if existing is None:
                block.key = key
                block.chain_id = next(self._serial)
                self._cache[key] = block.block_id
                self._placement.cached[block.block_id] = True
                parent = block.chain_id
            else:  # the same prefix was computed twice concurrently: keep the first copy findable
                parent = self.blocks[existing].chain_id
                block.chain_id = parent
            k += 1
        req.num_registered_blocks = k

    # ------------------------------------------------------------------ allocation
    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Grow ``req.block_ids`` to cover its next ``num_new_tokens`` positions."""
        n = self.num_new_blocks(req, num_new_tokens)
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {n}, {len(self._free)} free")
        place = self._placement
        while n > 0:
            bids = place.grow(req.block_ids[-1], n) if req.block_ids else []
            bids = bids or place.new_run(n) or [next(iter(self._free))]
            if req.block_ids:
                place.tail[req.block_ids[-1]] = False
            for bid in bids:
                self._take(bid)
                req.block_ids.append(bid)
            place.tail[bids[-1]] = True
            n -= len(bids)

    def _take(self, bid: int) -> None:
        """Hand out free block ``bid``, evicting it from the prefix cache."""
        del self._free[bid]
        self._placement.free[bid] = False
        block = self.blocks[bid]
        if block.key is not None:
            del self._cache[block.key]
            block.key = None
            self._placement.cached[bid] = False
        block.chain_id = -1
        block.ref_count = 1

    def free(self, req: Request) -> None:
        """Drop ``req``'s references; blocks nobody uses go to the back of the LRU free list.

        The tail of a sequence is freed first, so in LRU order it goes before the shareable prefix.
        """
        if req.block_ids:
            self._placement.tail[req.block_ids[-1]] = False
        for bid in reversed(req.block_ids):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None:
                    block.chain_id = -1
                self._free[bid] = None
                self._placement.release(bid)
        req.block_ids = []
        req.num_registered_blocks = 0
