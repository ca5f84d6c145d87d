"""A decoder embedder on the paged engine: prefill-only requests (chunked, finished by their last
chunk), prefix caching with the cold run's vector, no compiles while serving, and no LM head or
sampling traced into its steps (while generate steps keep theirs)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.pooled_results import PooledResults
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.step_results import EngineCounters, LaunchedStep
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from tests.engine.test_compilation import _Compiles


def _prefill_only(rid: str, n: int, first: int = 10) -> Request:
    return Request(rid, list(range(first, first + n)), SamplingParams(), max_tokens=0)


def test_prefill_only_requests_are_chunked_and_finish_with_their_last_chunk():
    """Plain Python: the scheduler chunks them, never reserves an output, and PooledResults finishes
    each one when (and only when) the chunk holding its last prompt token lands."""
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    results = PooledResults(sched, EngineCounters())
    a, b = _prefill_only("a", 10), _prefill_only("b", 3, first=50)
    sched.add(a)
    sched.add(b)

    def run(expect: list[tuple[str, int, int]]) -> LaunchedStep:
        out = sched.schedule()
        assert [(s.request.request_id, s.start, s.num_tokens) for s in out.scheduled] == expect
        return LaunchedStep(out.scheduled, sched.launch(out))

    first = run([("a", 0, 8)])  # the budget holds 8 tokens: a is chunked, b waits
    second = run([("a", 8, 2), ("b", 0, 3)])  # dispatched before the first step's result lands
    assert second.slots == [-1, -1] and a.output_token_ids == [] and b.output_token_ids == []
    assert sched.schedule().scheduled == []  # both prompts are in flight: nothing left to compute
    assert results.apply(first, np.array([[9.0]])) == [] and a.status is RequestStatus.RUNNING
    assert bm.num_cached_blocks == 2  # a's two full blocks are findable already
    done = results.apply(second, np.array([[1.0], [2.0]]))
    assert [(o.request_id, o.vector.tolist(), o.num_prompt_tokens) for o in done] == [("a", [1.0], 10), ("b", [2.0], 3)]
    assert a.status is b.status is RequestStatus.FINISHED_STOPPED and bm.num_used_blocks == 0
    c = _prefill_only("c", 9)  # a's first 8 tokens + one more
    assert len(bm.match_prefix(c)) == 2


@pytest.mark.hf_reference
def test_a_shared_prefix_hits_the_cache_and_gives_the_cold_vector(qwen3_paged_embedder, hf_checkpoints):
    engine = qwen3_paged_embedder
    bm, counters = engine.scheduler.block_manager, engine.counters
    vocab = hf_checkpoints("qwen3")[1].config.vocab_size
    rng = np.random.default_rng(123)
    prefix = rng.integers(3, vocab, 24).tolist()  # 6 full blocks of 4
    a, b = prefix + rng.integers(3, vocab, 5).tolist(), prefix + rng.integers(3, vocab, 7).tolist()

    def embed(seq: list[int]) -> tuple[np.ndarray, int, int, int]:
        """The vector, and the prefix-cache hits, computed tokens and steps it took."""
        hits, computed, steps = bm.prefix_hits, counters.prompt_tokens, counters.steps
        vec = engine.embed([seq])[0]
        return vec, bm.prefix_hits - hits, counters.prompt_tokens - computed, counters.steps - steps

    with _Compiles() as compiles:
        cold_b, hits, computed, steps = embed(b)
        assert (hits, computed, steps) == (0, 31, 2)  # cold: 31 tokens in chunks of 16 and 15
        _, hits, computed, _ = embed(a)
        assert (hits, computed) == (24, 5)  # the shared prefix's 6 blocks are not recomputed
        warm_b, hits, computed, steps = embed(b)
        assert (hits, computed, steps) == (28, 3, 1)  # b's 7 full blocks cached; its tail is computed
    assert compiles == []
    np.testing.assert_allclose(warm_b, cold_b, rtol=0, atol=1e-6)
    assert np.abs(warm_b - engine.embed([a])[0]).max() > 1e-2  # the twin: another input is told apart


@pytest.mark.hf_reference
def test_pooling_steps_have_no_lm_head_or_sampling(qwen3_paged_embedder):
    """The switch is made at trace time: a pooling step returns [B, D] vectors and holds no [B, V]
    logits; a generate runner over the same weights (the twin) still does, with every shape family."""
    from jaxserve.engine.compilation import BucketPolicy
    from jaxserve.engine.model_runner import ModelRunner

    runner = qwen3_paged_embedder.runner
    assert runner.compiled_shapes == BucketPolicy(4, 16, sampling=False).all_shapes()
    assert all(not s.extras and not s.grammar for s in runner.compiled_shapes)
    v, d = runner.vocab_size, qwen3_paged_embedder.model_config.hidden_size
    for shape in runner.compiled_shapes:
        (lowered,) = runner.lower(shape)
        text = lowered.as_text()
        assert f"tensor<{shape.num_seqs}x{v}xf32>" not in text
        assert f"tensor<{shape.num_seqs}x{d}xf32>" in text
    gen = ModelRunner(runner.loaded, num_blocks=8, block_size=4, max_model_len=64, buckets=BucketPolicy(4, 16),
                      backend="reference")  # lowered only, never compiled
    assert any(s.extras for s in gen.buckets.all_shapes()) and any(s.grammar for s in gen.buckets.all_shapes())
    shape = runner.compiled_shapes[0]
    assert f"tensor<{shape.num_seqs}x{v}xf32>" in gen.lower(shape)[0].as_text()
