"""Where a pooling step's result lands (plain Python, no jax): the prefill-only counterpart of
``step_results.StepResults``.

A prefill-only request (an embedding: ``Request.prefill_only``) is scheduled like any prompt —
chunked across steps, its leading blocks taken from the prefix cache — and never samples. When a
step's vectors reach the host, ``PooledResults.apply`` registers each request's newly full blocks
in the prefix cache (``Scheduler.resolve``) and decides, for every request, whether it is done:
the chunk that computed its prompt's last token carries its vector, and the request finishes
(``FINISHED_STOPPED``, blocks freed by ``Scheduler.finish``). That rule lives only here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.step_results import EngineCounters, LaunchedStep
from jaxserve.request import RequestStatus


@dataclasses.dataclass(frozen=True)
class PooledOutput:
    """A finished prefill-only request's vector."""

    request_id: str
    vector: np.ndarray  # f32[D]
    num_prompt_tokens: int


class PooledResults:
    """Applies launched pooling steps and their vectors to the requests (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, counters: EngineCounters) -> None:
        self.scheduler = scheduler
        self.counters = counters

    def apply(self, step: LaunchedStep, vectors: np.ndarray) -> list[PooledOutput]:
        """Finish every request whose last chunk ran in ``step``; returns their vectors."""
        outputs = []
        for row, s in enumerate(step.scheduled):
            req = s.request
            if req.status.finished:
                continue  # aborted while this step ran
            self.scheduler.resolve(req, -1, 0)  # no output slot: only the prefix-cache registration
            if not s.reaches_end:
                continue
            self.counters.requests_finished += 1
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            outputs.append(PooledOutput(req.request_id, vectors[row], req.num_prompt_tokens))
        return outputs
