"""The latency and size histograms (``engine/request_stats.py``) for requests whose tokens are known."""

from __future__ import annotations

from jaxserve.engine.request_stats import Histogram, one_two_five_buckets
from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine


def test_histogram_buckets_are_upper_bounds_inclusive():
    h = Histogram("x", (1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.snapshot().counts == (2, 1, 1) and h.snapshot().total == 6.0
    assert one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)


def _delta(before, after, name):
    b, a = before.histograms[name], after.histograms[name]
    return a.count - b.count, a.total - b.total


def test_histograms_for_known_requests(lookback_model):
    eng = make_engine(lookback_model)
    before = eng.metrics()
    prompts = [[10, 20, 30], list(range(40, 90))]  # 3 and 50 prompt tokens
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    after = eng.metrics()
    assert [len(o) for o in outs] == [7, 7]
    assert _delta(before, after, "request_generation_tokens") == (2, 14.0)
    assert _delta(before, after, "request_prompt_tokens") == (2, 53.0)
    ttft_n, ttft = _delta(before, after, "time_to_first_token_seconds")
    itl_n, itl = _delta(before, after, "inter_token_latency_seconds")
    e2e_n, e2e = _delta(before, after, "e2e_request_latency_seconds")
    assert (ttft_n, itl_n, e2e_n) == (2, 12, 2)  # one first token and 6 later ones per request
    assert 0 < ttft <= e2e and 0 < itl <= e2e
    parts = sum(_delta(before, after, f"request_{p}_time_seconds")[1] for p in ("queue", "prefill", "decode"))
    assert parts <= e2e + 1e-6
    steps = after.steps - before.steps
    assert _delta(before, after, "iteration_tokens_total") == (steps, float(after.prompt_tokens - before.prompt_tokens
                                                                              + 14 - 2))
    assert 0 < _delta(before, after, "engine_step_time_seconds")[0] <= steps + 1
    assert after.compiles_while_serving == before.compiles_while_serving  # serving compiled nothing


def test_a_compile_while_serving_is_counted(lookback_model):
    import threading

    import jax
    import jax.numpy as jnp

    eng = make_engine(lookback_model)
    x = jnp.arange(7)
    before = eng.metrics().compiles_while_serving
    jax.jit(lambda x: x * 3 + 1)(x).block_until_ready()  # one new executable, on the engine's thread
    assert eng.metrics().compiles_while_serving == before + 1
    other = threading.Thread(target=lambda: jax.jit(lambda x: x * 5 - 1)(x).block_until_ready())
    other.start()
    other.join()
    assert eng.metrics().compiles_while_serving == before + 1  # another thread's compile is not the engine's
