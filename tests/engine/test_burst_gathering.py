"""The engine loop gathers a burst into one step (AsyncEngine._gather_burst).

An idle engine that receives several requests at once, or an engine whose step in flight carries
prompt chunks (``admitting``), keeps taking the requests that follow within ``burst_gap_s`` (for at
most ``burst_window_s``) before it schedules; a lone request on an idle engine steps at once. Gaps
and windows are widened here so that a loaded test machine cannot blur them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.server.test_engine_states import FakeLLM


class RecordingLLM(FakeLLM):
    """FakeLLM that records the requests present at each step and when it ran; with
    ``prefill_s``, its first step counts as a prompt step running for that long (``admitting``)."""

    def __init__(self, prefill_s: float = 0.0) -> None:
        super().__init__()
        self.steps: list[tuple[float, set[str]]] = []
        self.prefill_s = prefill_s

    @property
    def admitting(self) -> bool:
        return bool(self.steps) and time.monotonic() - self.steps[0][0] < self.prefill_s

    def step(self):
        self.steps.append((time.monotonic(), set(self.pending)))
        return super().step()


def _engine(gap: float, window: float, prefill_s: float = 0.0) -> tuple[AsyncEngine, RecordingLLM]:
    llm = RecordingLLM(prefill_s)
    engine = AsyncEngine(lambda: llm)
    engine.burst_gap_s, engine.busy_gap_s, engine.burst_window_s = gap, gap, window
    engine.start()
    engine.wait_ready(5)
    return engine, llm


def _submit_over_time(engine: AsyncEngine, groups: list[int], interval: float) -> float:
    """Submit ``groups[i]`` choices at ``i * interval`` s; returns when the first group was sent."""
    async def go() -> float:
        subs, t0 = [], time.monotonic()
        for i, n in enumerate(groups):
            if i:
                await asyncio.sleep(interval)
            subs.append(engine.submit(f"g{i}", [[1]] * n, [SamplingParams(max_tokens=1)] * n))
        for sub in subs:
            async for _ in sub.outputs():
                pass
        return t0

    return asyncio.run(go())


BURST = {"g0-0", "g0-1", "g1-0", "g2-0"}


def test_burst_shares_the_first_step():
    engine, llm = _engine(gap=1.0, window=3.0)
    try:
        _submit_over_time(engine, [2, 1, 1], interval=0.3)
    finally:
        engine.shutdown()
    assert llm.steps[0][1] == BURST


def test_without_gathering_the_burst_splits():  # the twin: the same arrivals, burst_window_s = 0
    engine, llm = _engine(gap=1.0, window=0.0)
    try:
        _submit_over_time(engine, [2, 1, 1], interval=0.3)
    finally:
        engine.shutdown()
    assert "g0-0" in llm.steps[0][1] and "g2-0" not in llm.steps[0][1]


def test_a_lone_request_never_waits():
    engine, llm = _engine(gap=5.0, window=5.0)
    try:
        t0 = _submit_over_time(engine, [1], interval=0.0)
    finally:
        engine.shutdown()
    assert llm.steps[0][1] == {"g0-0"} and llm.steps[0][0] - t0 < 1.0


def test_the_window_caps_the_wait():
    engine, llm = _engine(gap=0.5, window=0.6)
    try:
        t0 = _submit_over_time(engine, [2] + [1] * 14, interval=0.1)
    finally:
        engine.shutdown()
    first_at, first = llm.steps[0]
    assert 3 <= len(first) < 16 and first_at - t0 < 1.2


def test_arrivals_during_a_prompt_step_share_the_next_step():
    engine, llm = _engine(gap=0.5, window=2.0, prefill_s=1.5)
    try:
        _submit_over_time(engine, [1, 1, 1], interval=0.1)
    finally:
        engine.shutdown()
    assert [s for _, s in llm.steps[:2]] == [{"g0-0"}, {"g1-0", "g2-0"}]


def test_arrivals_after_a_decode_step_do_not_wait():  # the twin: the step in flight holds no prompt
    engine, llm = _engine(gap=0.5, window=2.0, prefill_s=0.0)
    try:
        _submit_over_time(engine, [1, 1, 1], interval=0.3)
    finally:
        engine.shutdown()
    assert [s for _, s in llm.steps[:3]] == [{"g0-0"}, {"g1-0"}, {"g2-0"}]


class _Running:
    """Stands in for a step's device output that is not ready yet."""

    def is_ready(self) -> bool:
        return False


def _still_running(eng):  # noqa: ANN001, ANN202 - an LLMEngine; returns its real step in flight
    step = eng._inflight
    eng._inflight = dataclasses.replace(step, handle=dataclasses.replace(step.handle, tokens=_Running()))
    return step


def test_llm_engine_admitting_while_a_prompt_step_runs(lookback_model):
    eng = make_engine(lookback_model)
    eng.add_request("a", [10, 20, 30], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.step()  # the prompt step is in flight
    real = _still_running(eng)
    assert eng.admitting  # a prompt step, still running
    eng._inflight = real
    eng.runner.fetch(eng._inflight.handle)
    assert not eng.admitting  # done on the device
    eng.step()  # a decode step is in flight
    real = _still_running(eng)
    assert not eng.admitting  # running, but without prompt chunks
    eng._inflight = real
    while eng.has_unfinished():
        eng.step()
