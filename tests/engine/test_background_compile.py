"""Background compilation (``--background-compile``): ready after the largest shape of each
family; smaller batches run padded in it, a step with no ready shape of its family waits for its
executable; the results are the ones an engine that compiled everything first gives."""

from __future__ import annotations

import threading
import time

import pytest

from jaxserve.engine.background_compile import BackgroundCompiler
from jaxserve.config import ServeConfig
from jaxserve.engine.compilation import BucketPolicy, StepShape
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.sampling_params import SamplingParams
from tests.helpers import lookback_continue

ENGINE = dict(max_num_seqs=2, max_num_batched_tokens=16, block_size=4, max_model_len=256, compilation_cache_dir="",
              dtype="float32", kv_cache_memory_gib=0.0625, background_compile=True)


def test_ready_shapes_hold_every_plain_batch():
    b = BucketPolicy(max_num_seqs=8, max_num_batched_tokens=64, min_decode_batch=2)
    assert b.ready_shapes() == [StepShape(8, 8, True), StepShape(64, 8, False)]
    assert sorted(b.ready_shapes() + b.background_order()) == b.all_shapes()
    assert b.background_order()[0] == StepShape(2, 2, True)  # single-stream decode first
    for seqs, tokens in [(1, 1), (3, 3), (8, 8), (1, 16), (3, 40), (8, 64)]:
        want = b.shape_for(seqs, tokens)
        got = b.fallback(want, b.ready_shapes())
        assert got is not None and got.num_tokens >= tokens and got.num_seqs >= seqs
        assert got.decode_only == want.decode_only
    assert b.fallback(StepShape(2, 2, True), b.all_shapes()) == StepShape(2, 2, True)  # its own shape first
    # The twin: no plain shape stands in for a logits-processor or grammar shape.
    assert b.fallback(b.shape_for(1, 1, extras=True), b.ready_shapes()) is None
    assert b.fallback(b.shape_for(1, 1, grammar=True), b.ready_shapes()) is None


def test_the_compiler_runs_in_order_and_a_wait_jumps_the_queue():
    done: list[int] = []
    gate = threading.Event()

    def compile_shape(shape):
        gate.wait()
        done.append(shape.num_tokens)

    shapes = [StepShape(t, 1, True) for t in (1, 2, 3, 4)]
    c = BackgroundCompiler(compile_shape, shapes)
    threading.Timer(0.2, gate.set).start()
    c.wait_for(shapes[3])  # queued last: compiled second (the first had already started)
    assert 4 in done[:2] and c.waits == 1
    c.stop(timeout=None)
    assert c.pending == 0 and sorted(done) == [1, 2, 3, 4]

    def broken(shape):
        raise ValueError("no")

    c = BackgroundCompiler(broken, shapes[:2])
    with pytest.raises(RuntimeError, match="background compile"):
        c.wait_for(shapes[1])


def test_serving_while_shapes_compile_matches_the_reference(lookback_model, monkeypatch):
    """Plain batches run in the ready shapes while the background compiler is held back; a step
    with logits-processor rows waits for its shape; shapes compiled meanwhile are warmed up when
    idle and then used; nothing compiles on the engine thread."""
    gate = threading.Event()
    compile_shapes = ModelRunner._compile

    def gated(self, todo, **kw):
        if threading.current_thread().name == "jaxserve-compile":
            gate.wait()
        return compile_shapes(self, todo, **kw)

    monkeypatch.setattr(ModelRunner, "_compile", gated)
    eng = LLMEngine(ServeConfig(**{**ENGINE, "model": str(lookback_model)}), progress=False)
    try:
        runner = eng.runner
        assert runner.compiled_shapes == runner.buckets.ready_shapes()
        assert eng.metrics().compiles_pending == len(runner.buckets.background_order())
        prompts = [[10, 20, 30], [100], list(range(40, 52))]
        greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        assert eng.generate(prompts, greedy) == [lookback_continue(p, 5) for p in prompts]
        assert runner.compiled_shapes == runner.buckets.ready_shapes()  # served in them, padded

        threading.Timer(0.3, gate.set).start()
        biased = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias=((299, -5.0),))
        assert eng.generate([[10, 20, 30]], biased) == [lookback_continue([10, 20, 30], 5)]
        m = eng.metrics()
        assert m.compile_waits >= 1 and m.compiles_while_serving == 0
        assert StepShape(1, 1, True) in runner.compiled_shapes  # compiling when the gate opened
        while eng.idle_work():  # what the async engine does when idle: warm the new shapes up
            pass
        assert eng.generate([[100]], greedy) == [lookback_continue([100], 5)]  # in its own (1, 1) shape now
        assert runner.buckets.fallback(StepShape(1, 1, True), runner._warm) == StepShape(1, 1, True)
        assert eng.metrics().compiles_while_serving == 0
    finally:
        gate.set()
        eng.close()
    # close() waits for the compile under way: a daemon thread left inside XLA aborts the process at exit.
    assert not runner.background._thread.is_alive()
