"""Which tokens run in the next step (plain Python, no jax).

One policy covers prefill, chunked prefill, decode and recompute after preemption: every
scheduled request advances by ``num_tokens - num_computed_tokens`` tokens, capped by the step's
token budget. Running requests go first (in arrival order), then waiting ones are admitted while
the budget, ``max_num_seqs`` and free blocks allow (and, with LoRA, at most ``max_loras`` distinct
adapters run at once: a request of another adapter waits without blocking those behind it). When
a running request cannot get a block, the most recently admitted running request is preempted
(blocks freed, recomputed later).

The scheduler owns each request's KV state: ``launch`` counts a dispatched step's tokens as computed
and reserves a ``PLACEHOLDER`` output for each chunk that samples, ``resolve`` fills it when the
step's tokens reach the host and registers newly full blocks for prefix caching, preemption resets
it and ``finish`` frees it. *Which* token ends a request is decided in ``engine/step_results.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from jaxserve.engine.block_manager import BlockManager
from jaxserve.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
    """``request`` computes ``num_tokens`` tokens this step, starting at ``start``.

    ``reaches_end``: this chunk computes the sequence's last token (a prompt's last chunk, or a
    decode). ``samples``: it reaches the end of a generating sequence, so its last logits are
    sampled (a prefill-only request's last chunk is pooled instead). Both are fixed when the chunk
    is scheduled (launching it appends a placeholder output, after which the sequence is longer)
    and read several times per step, so they are stored, not recomputed.
    """

    request: Request
    start: int
    num_tokens: int
    reaches_end: bool = dataclasses.field(init=False)
    samples: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        end = self.start + self.num_tokens == self.request.num_tokens
        object.__setattr__(self, "reaches_end", end)
        object.__setattr__(self, "samples", end and not self.request.prefill_only)


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

    def __init__(
        self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int, max_loras: int = 0
    ) -> None:
        """``max_loras``: at most this many distinct LoRA adapters among the running requests."""
        self.block_manager = block_manager
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        """Queue ``req`` as waiting; ValueError if its prompt plus ``max_tokens`` can never fit in the cache."""
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
        """The next step's requests and token counts within ``max_num_batched_tokens`` and ``max_num_seqs``.

        Running requests first, in admission order, each its remaining tokens (a chunk when the budget
        runs out); when blocks run short the most recently admitted is preempted (recomputed later).
        Waiting requests are admitted (prefix-cache hits skipped) only when nothing was preempted."""
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
            now = time.monotonic()
            while budget > 0 and len(self.running) < self.max_num_seqs:
                req = self._next_admissible()
                if req is None:
                    break
                hits = bm.match_prefix(req)
                n = min(req.num_tokens - len(hits) * bm.block_size - req.num_computed_tokens, budget)
                if not bm.can_admit(req, hits, n):
                    break
                self.waiting.remove(req)
                if bm.enable_prefix_caching:
                    bm.acquire_prefix(req, hits)
                bm.allocate(req, n)
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                self.running.append(req)
                scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n))
                budget -= n
        return SchedulerOutput(scheduled, preempted)

    def _next_admissible(self) -> Request | None:
        """The first waiting request whose LoRA adapter fits beside the running ones (``max_loras``
        distinct adapters at most); requests of other adapters wait without blocking it."""
        if not self.max_loras:
            return self.waiting[0] if self.waiting else None
        active = {r.lora_id for r in self.running} - {0}
        full = len(active) >= self.max_loras
        return next((r for r in self.waiting if not (full and r.lora_id and r.lora_id not in active)), None)

    def launch(self, out: SchedulerOutput) -> list[int]:
        """``out`` was dispatched: its tokens count as computed, and each chunk that reaches the end
        of its sequence reserves the next output (a ``PLACEHOLDER``). Returns each request's output
        index (-1: a prefill chunk that does not sample)."""
        slots = []
        for s in out.scheduled:
            samples = s.samples
            s.request.num_computed_tokens += s.num_tokens
            slots.append(s.request.add_placeholder() if samples else -1)
        return slots

    def resolve(self, req: Request, slot: int, token: int) -> None:
        """A step's result reached the host: fill output ``slot`` (-1: none) with ``token`` and make
        the blocks now full of known tokens findable by later requests."""
        if slot >= 0:
            req.resolve_output(slot, token)
        if req.block_ids:
            self.block_manager.register_full_blocks(req, req.num_known_tokens)

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
