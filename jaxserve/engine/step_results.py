"""Where a step's result lands: its sampled tokens are applied to their requests in one place.

``StepResults.apply`` takes a launched step (``LaunchedStep``: what was scheduled and which output
slot each request's token fills) and the sampled ids read back from the device. For each request it
resolves the placeholder and registers full prefix blocks (``Scheduler.resolve``), detokenizes
(``OutputProcessor``), decides whether the request is done (``decide_finish``: the one function
for EOS, stop ids, stop strings, length and ``min_tokens``), and frees a finished request's blocks
(``Scheduler.finish``). Each token and each finish is also where the latency histograms are fed
(``request_stats.RequestStats``: time to first token, inter-token latency, per-request totals).
Plain Python, no jax.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from jaxserve.engine.output_processor import OutputProcessor, RequestOutput, TokenLogprob
from jaxserve.engine.request_stats import RequestStats
from jaxserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from jaxserve.request import NO_TOKEN, Finish, Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LaunchedStep:
    """A dispatched step as the host sees it: what ran and the output slot each request's token fills."""

    scheduled: list[ScheduledRequest]
    slots: list[int]  # output index per request; -1 for a prefill chunk that does not sample


@dataclasses.dataclass(frozen=True)
class SampledTokens:
    """A step's result on the host, one row per scheduled request."""

    token_ids: list[int]
    logprob: np.ndarray | None = None  # f32[n] the sampled token's logprob (when a request asked)
    top_ids: np.ndarray | None = None  # i32[n, k]
    top_vals: np.ndarray | None = None  # f32[n, k]

    def logprobs_for(self, row: int, k: int | None) -> list[TokenLogprob] | None:
        """Row ``row``'s sampled token with its logprob and its ``k`` most likely alternatives; None when not asked."""
        if k is None or self.logprob is None:
            return None
        assert self.top_ids is not None and self.top_vals is not None
        top = list(zip(self.top_ids[row, :k].tolist(), self.top_vals[row, :k].tolist(), strict=True))
        return [TokenLogprob(self.token_ids[row], float(self.logprob[row]), top)]


def stop_strings_active(req: Request, num_outputs: int) -> bool:
    """Whether a stop may end ``req`` once it has ``num_outputs`` tokens (``min_tokens``)."""
    return num_outputs >= req.params.min_tokens


def decide_finish(req: Request, num_outputs: int, token: int, stop_str: str | None) -> Finish | None:
    """Whether ``req`` ends with its ``num_outputs``-th token ``token`` (``stop_str``: a matched stop string).

    Below ``min_tokens`` no stop ends it (EOS and stop ids are also masked when sampling, in
    ``logits_processors``); ``max_tokens`` always does. A grammar that is complete (or rejected the
    token) ends the request as stopped whatever ``min_tokens`` says: nothing else may follow.
    """
    p = req.params
    if req.grammar is not None and req.grammar.done:
        return Finish(RequestStatus.FINISHED_STOPPED)
    if stop_strings_active(req, num_outputs):
        if stop_str is not None:
            return Finish(RequestStatus.FINISHED_STOPPED, stop_str)
        if token in p.stop_token_ids:
            return Finish(RequestStatus.FINISHED_STOPPED, token)
        if not p.ignore_eos and token in req.eos_token_ids:
            return Finish(RequestStatus.FINISHED_STOPPED)
    if num_outputs >= req.max_tokens:
        return Finish(RequestStatus.FINISHED_LENGTH)
    return None


@dataclasses.dataclass
class EngineCounters:
    """Monotonic counters for metrics (plain ints: readable from other threads)."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0


class StepResults:
    """Applies launched steps and their sampled tokens to the requests (see the module docstring)."""

    def __init__(
        self, scheduler: Scheduler, outputs: OutputProcessor, counters: EngineCounters, stats: RequestStats
    ) -> None:
        self.scheduler = scheduler
        self.outputs = outputs
        self.counters = counters
        self.stats = stats

    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        """``sched`` was dispatched: count it, and let the scheduler advance its requests."""
        self.counters.steps += 1
        self.stats.on_dispatch(sched.num_tokens)
        for s in sched.scheduled:
            end = min(s.start + s.num_tokens, s.request.num_prompt_tokens)
            self.counters.prompt_tokens += max(0, end - s.start)
        return LaunchedStep(sched.scheduled, self.scheduler.launch(sched))

    def apply(self, step: LaunchedStep, sampled: SampledTokens) -> list[RequestOutput]:
        """Resolve ``step``'s tokens; returns an output per sampled request that is still live."""
        outputs = []
        now = time.monotonic()
        for row, (s, slot) in enumerate(zip(step.scheduled, step.slots, strict=True)):
            req = s.request
            if req.status.finished:
                continue  # finished or aborted while this step ran: its token is dropped
            token = sampled.token_ids[row]
            if token == NO_TOKEN and slot >= 0:
                outputs.append(self._no_token(req, slot))
                continue
            self.scheduler.resolve(req, slot, token)
            if slot < 0:
                continue
            try:
                if req.grammar is not None and not req.grammar.consume(token):
                    logger.warning("request %s: its grammar rejected token %d: %s", req.request_id, token,
                                   req.grammar.error)
                self.counters.generation_tokens += 1
                self.stats.on_token(req, now)
                lp = sampled.logprobs_for(row, req.params.logprobs)
                outputs.append(self._output(req, slot + 1, token, lp, now))
            except Exception as e:  # noqa: BLE001 - a fault in one request's processing ends that request alone
                outputs.append(self.fail(req, e))
        return outputs

    def fail(self, req: Request, err: Exception) -> RequestOutput:
        """End ``req`` because its own processing raised ``err`` (detokenizer, grammar, logits inputs):
        its blocks are freed and its last output carries the error; other requests go on."""
        logger.error("request %s failed inside the engine: %s: %s", req.request_id, type(err).__name__, err,
                     exc_info=err)
        if not req.status.finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self.counters.requests_aborted += 1
        self.outputs.remove(req.request_id)
        out = self.outputs.build(req, [], "", Finish(RequestStatus.FINISHED_ABORTED), None, req.num_output_tokens)
        out.finish_reason, out.error = "error", f"{type(err).__name__}: {err}"
        return out

    def _no_token(self, req: Request, slot: int) -> RequestOutput:
        """The row's grammar mask and bias allowed no token: stop without one (never emit token 0)."""
        logger.warning(
            "request %s: no token is allowed by its grammar%s; finishing it", req.request_id,
            " once min_tokens masks EOS" if slot < req.params.min_tokens else "",
        )
        text, _ = self.outputs.flush_text(req, check_stops=False)
        req.truncate_outputs(slot)
        self.counters.requests_finished += 1
        self.stats.on_finish(req, time.monotonic())
        self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        self.outputs.remove(req.request_id)
        return self.outputs.build(req, [], text, Finish(RequestStatus.FINISHED_STOPPED), None, slot)

    def _output(
        self, req: Request, num_outputs: int, token: int, logprobs: list[TokenLogprob] | None, now: float
    ) -> RequestOutput:
        """Detokenize ``token``, decide whether ``req`` is done, and free it if so."""
        text, stop_str = self.outputs.update_text(req, [token], check_stops=stop_strings_active(req, num_outputs))
        finish = decide_finish(req, num_outputs, token, stop_str)
        if finish is not None and stop_str is None:  # emit what was held back for a possible stop string
            more, stop_str = self.outputs.flush_text(req, check_stops=stop_strings_active(req, num_outputs))
            text += more
            finish = decide_finish(req, num_outputs, token, stop_str)
        if finish is not None:
            req.truncate_outputs(num_outputs)
            self.counters.requests_finished += 1
            self.stats.on_finish(req, now)
            self.scheduler.finish(req, finish.status)
            self.outputs.remove(req.request_id)
        return self.outputs.build(req, [token], text, finish, logprobs, num_outputs)
