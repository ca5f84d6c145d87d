"""Admission (engine/interface.py) and the client's submissions: validated once, one queue rule,
and a submission that is dropped unread aborts its engine requests (a client gone before admission
to the engine thread costs no compute)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time

import pytest

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.interface import (
    EngineInfo,
    PromptTooLongError,
    QueueFullError,
    admit,
    check_queue,
)
from jaxserve.sampling_params import SamplingParamError, SamplingParams
from tests.server.test_engine_states import FakeLLM

INFO = EngineInfo(tokenizer=None, max_model_len=16, vocab_size=10, kv_capacity_tokens=12, default_sampling={})


def test_admit_resolves_max_tokens():
    assert admit([1, 2, 3], SamplingParams(max_tokens=5), INFO).max_tokens == 5
    # Without max_tokens: what max_model_len leaves, but never more than the cache holds.
    with pytest.raises(SamplingParamError, match="needs 16 KV positions but the cache holds 12"):
        admit([1, 2, 3], SamplingParams(max_tokens=None), INFO)
    roomy = EngineInfo(None, 16, 10, 64, {})
    assert admit([1, 2, 3], SamplingParams(max_tokens=None), roomy).max_tokens == 13


@pytest.mark.parametrize("prompt,params,param", [
    ([], SamplingParams(max_tokens=1), "prompt"),
    ([1, 10], SamplingParams(max_tokens=1), "prompt"),
    ([1], SamplingParams(max_tokens=1, stop_token_ids=(11,)), "stop_token_ids"),
    ([1], SamplingParams(max_tokens=1, logit_bias=((10, 1.0),)), "logit_bias"),
    ([1] * 10, SamplingParams(max_tokens=7), "max_tokens"),
    ([1] * 10, SamplingParams(max_tokens=3), "max_tokens"),  # fits max_model_len, not the cache
])
def test_admit_names_the_bad_field(prompt, params, param):
    with pytest.raises(SamplingParamError) as e:
        admit(prompt, params, INFO)
    assert e.value.param == param


def test_prompt_too_long_states_both_numbers():
    with pytest.raises(PromptTooLongError, match="maximum context length is 16 tokens.*17 tokens"):
        admit([1] * 10, SamplingParams(max_tokens=7), INFO)


def test_one_queue_rule():
    check_queue(0, 2, 2)
    check_queue(5, 100, None)
    with pytest.raises(QueueFullError, match="1 requests are already waiting \\(limit 2\\)"):
        check_queue(1, 2, 2)
    with pytest.raises(QueueFullError):
        check_queue(0, 1, 0)


def test_dropped_submission_aborts_its_requests():
    hold = threading.Event()
    llm = FakeLLM(hold=hold)
    aborted: list[str] = []
    real_abort = llm.abort
    llm.abort = lambda rid: (aborted.append(rid), real_abort(rid))[1]
    engine = AsyncEngine(lambda: llm)
    engine.start()
    engine.wait_ready(5)

    async def submit_and_drop() -> None:
        sub = engine.submit("r", [[1], [2]], [SamplingParams(max_tokens=50)] * 2)
        del sub  # never iterated: e.g. the client left before the response body started
        gc.collect()

    asyncio.run(submit_and_drop())
    hold.set()  # the engine thread may sit in a step; the aborts are applied before the next one
    deadline = time.monotonic() + 5
    while len(aborted) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(aborted) == ["r-0", "r-1"]
    engine.shutdown()
    assert not llm.pending


def test_invalid_choice_queues_nothing():
    llm = FakeLLM()
    engine = AsyncEngine(lambda: llm)
    engine.start()
    engine.wait_ready(5)

    async def submit() -> None:
        engine.submit("r", [[1], [99]], [SamplingParams(max_tokens=1)] * 2)

    with pytest.raises(SamplingParamError, match="token id 99"):
        asyncio.run(submit())
    engine.shutdown()
    assert not llm.pending and engine.metrics().num_waiting == 0


class _SlowCompiler:
    """Compiles nothing: waits ``delay`` seconds and counts the compiles it was asked for."""

    def __init__(self, delay: float) -> None:
        self.delay, self.calls = delay, 0

    def compile(self, spec):
        self.calls += 1
        time.sleep(self.delay)
        return f"compiled {spec.kind}"


def test_grammars_compile_off_the_engine_thread_once_per_spec_and_time_out():
    from jaxserve.engine.grammar import GrammarError
    from jaxserve.sampling_params import StructuredOutput

    llm = FakeLLM()
    slow = _SlowCompiler(0.05)
    llm.info = dataclasses.replace(llm.info, grammars=slow)
    engine = AsyncEngine(lambda: llm)
    engine.start()
    engine.wait_ready(5)
    regex = StructuredOutput("regex", "a+", param="guided_regex")
    params = [SamplingParams(structured=regex), SamplingParams(), SamplingParams(structured=regex)]
    got = asyncio.run(engine.compile_grammars(params))
    assert got == ["compiled regex", None, "compiled regex"] and slow.calls == 1
    slow.delay = 1.0
    with pytest.raises(GrammarError, match="longer than 0.1s to compile") as err:
        asyncio.run(engine.compile_grammars(params, timeout=0.1))
    assert err.value.param == "guided_regex"
    assert asyncio.run(engine.compile_grammars([SamplingParams()])) == [None]
    engine.shutdown()
