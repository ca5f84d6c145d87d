"""Which tokens run in the next step (plain Python, no jax).

One policy covers prefill, chunked prefill, decode and recompute after preemption: every
scheduled request advances by ``num_tokens - num_computed_tokens`` tokens, capped by the step's
token budget. Running requests go first (in arrival order), then waiting ones are admitted while
the budget, ``max_num_seqs`` and free blocks allow. When a running request cannot get a block,
the most recently admitted running request is preempted (blocks freed, recomputed later).
"""

from __future__ import annotations

import dataclasses
from collections import deque

from jaxserve.engine.block_manager import BlockManager
from jaxserve.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
    """``request`` computes ``num_tokens`` tokens this step, starting at ``start``."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True if this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_tokens == 1 for s in self.scheduled)


class Scheduler:
    """Continuous batching over a BlockManager within ``max_num_seqs`` and a token budget."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        if self.block_manager.blocks_needed(req.num_prompt_tokens + req.max_tokens) > self.block_manager.num_usable_blocks:
            raise ValueError(
                f"request needs {req.num_prompt_tokens + req.max_tokens} KV positions but the cache "
                f"holds {self.block_manager.num_usable_blocks * self.block_manager.block_size}"
            )
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.reached_max_tokens:  # its last token is in flight; it finishes when that arrives
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(req, n):
                victim = self.running.pop()  # the most recently admitted request
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                self.block_manager.allocate(req, n)
                scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n))
                budget -= n
                i += 1
                continue
            break  # ``req`` itself was preempted: nothing after it can run either

        if not preempted:
            bm = self.block_manager
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                req = self.waiting[0]
                hits = bm.match_prefix(req)
                n = min(req.num_tokens - len(hits) * bm.block_size - req.num_computed_tokens, budget)
                if not bm.can_admit(req, hits, n):
                    break
                self.waiting.popleft()
                if bm.enable_prefix_caching:
                    bm.acquire_prefix(req, hits)
                bm.allocate(req, n)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n))
                budget -= n
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request (finished or aborted) and free its blocks."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.block_manager.free(req)
