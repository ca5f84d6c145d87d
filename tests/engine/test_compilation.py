"""Fixed shapes: all buckets compiled at start-up, no compile while serving, KV updated in place."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from jaxserve.engine.compilation import BucketPolicy, StepShape, mixed_row_floor
from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.helpers import lookback_continue


def test_bucket_choice():
    b = BucketPolicy(max_num_seqs=8, max_num_batched_tokens=64)
    assert b.decode_sizes == [1, 2, 4, 8] and b.prefill_sizes == [16, 32, 64]
    assert b.shape_for(1, 1) == StepShape(1, 1, True)
    assert b.shape_for(5, 5) == StepShape(8, 8, True)
    assert b.shape_for(3, 20) == StepShape(32, 4, False)
    assert b.shape_for(5, 20) == StepShape(32, 8, False)
    assert b.shape_for(1, 64) == StepShape(64, 4, False)
    with pytest.raises(ValueError):
        b.shape_for(9, 9)
    # Steps with logits-processor inputs use the largest bucket of their family.
    assert b.shape_for(2, 2, extras=True) == StepShape(8, 8, True, extras=True)
    assert b.shape_for(2, 20, extras=True) == StepShape(64, 8, False, extras=True)
    assert StepShape(8, 8, True, extras=True) in b.all_shapes()
    # Steps with a grammar row: decode steps at their own bucket; with extras or a prefill, the
    # largest bucket of the family with extras and the mask.
    assert b.shape_for(2, 2, grammar=True) == StepShape(2, 2, True, grammar=True)
    assert b.shape_for(2, 2, extras=True, grammar=True) == StepShape(8, 8, True, extras=True, grammar=True)
    assert b.shape_for(2, 20, grammar=True) == StepShape(64, 8, False, extras=True, grammar=True)
    assert sum(s.grammar for s in b.all_shapes()) == len(b.decode_sizes) + 2


def test_mixed_buckets_step_by_multiples_above_128_tokens():
    # A burst of 603 prompt tokens pads to 640 at a 640 budget, to 768 at 1024 (not to 1024);
    # larger budgets keep at most 4 multiples of a doubled step.
    assert BucketPolicy(32, 640).shape_for(16, 603) == StepShape(640, 32, False)
    b = BucketPolicy(max_num_seqs=32, max_num_batched_tokens=1024)
    assert b.prefill_sizes == [16, 32, 64, 128, 256, 512, 768, 1024]
    assert b.shape_for(16, 603) == StepShape(768, 32, False)
    assert BucketPolicy(32, 256).prefill_sizes == [16, 32, 64, 128, 256]
    assert BucketPolicy(32, 300).prefill_sizes == [16, 32, 64, 128, 256, 300]
    assert BucketPolicy(32, 512).prefill_sizes == [16, 32, 64, 128, 256, 384, 512]
    assert BucketPolicy(256, 8192).prefill_sizes == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144, 8192]
    assert BucketPolicy(4, 48).prefill_sizes == [16, 32, 48]


def test_mixed_buckets_are_chosen_by_tokens_and_sequences():
    # 32 sequences and a 256-token budget on CPU: rows 4 × 8^k below min(T, 32), then min(T, 32).
    b = BucketPolicy(max_num_seqs=32, max_num_batched_tokens=256)
    assert [b.mixed_rows(t) for t in b.prefill_sizes] == [[4, 16], [4, 32], [4, 32], [4, 32], [4, 32]]
    assert b.shape_for(1, 20) == StepShape(32, 4, False)  # a lone prompt: 4 logits rows, not 32
    assert b.shape_for(4, 32) == StepShape(32, 4, False)
    assert b.shape_for(5, 32) == StepShape(32, 32, False)  # one sequence more than 4 rows hold
    assert b.shape_for(3, 16) == StepShape(16, 4, False)
    assert b.shape_for(15, 16) == StepShape(16, 16, False)
    assert b.shape_for(2, 200) == StepShape(256, 4, False)
    assert b.shape_for(17, 250) == StepShape(256, 32, False)
    assert b.shape_for(2, 200, extras=True) == StepShape(256, 32, False, extras=True)  # extras: the largest
    assert b.ready_shapes() == [StepShape(32, 32, True), StepShape(256, 32, False)]
    assert BucketPolicy(256, 8192).mixed_rows(8192) == [4, 32, 256]
    # Accelerators keep one row size per token size: the shapes they compiled before.
    g = BucketPolicy(32, 256, min_mixed_rows=mixed_row_floor("gpu", 32))
    assert [(s.num_tokens, s.num_seqs) for s in g.all_shapes() if not (s.decode_only or s.extras)] == [
        (16, 16), (32, 32), (64, 32), (128, 32), (256, 32)]
    assert len(b.all_shapes()) == len(g.all_shapes()) + 5
    # The background compiles still start with the small decodes, then short prefills, few rows first.
    assert b.background_order()[:6] == [StepShape(t, t, True) for t in (1, 2, 4, 8, 16)] + [StepShape(16, 4, False)]


@pytest.mark.parametrize("policy", [BucketPolicy(32, 256), BucketPolicy(8, 64), BucketPolicy(64, 512, min_mixed_rows=2),
                                    BucketPolicy(32, 256, min_mixed_rows=32), BucketPolicy(3, 40, min_decode_batch=2)])
def test_every_batch_lands_in_the_smallest_compiled_shape_that_holds_it(policy):
    shapes = policy.all_shapes()
    for seqs in range(1, policy.max_num_seqs + 1):
        for tokens in range(seqs, policy.max_num_batched_tokens + 1):
            for extras, grammar in [(False, False), (True, False), (False, True)]:
                got = policy.shape_for(seqs, tokens, extras, grammar)
                assert got in shapes
                # tokens, sequences and logits rows (one per sequence) all fit
                assert got.num_tokens >= tokens and got.num_seqs >= seqs, (seqs, tokens, got)
                assert got.decode_only == (seqs == tokens)
                if not (extras or grammar):
                    want = StepShape(tokens, seqs, seqs == tokens)
                    assert got == policy.fallback(want, shapes), (seqs, tokens, got)


def test_decode_floor_holds_with_one_sequence():
    # bf16 on CPU: a one-row product is a slow path, so even --max-num-seqs 1 decodes two rows.
    b = BucketPolicy(max_num_seqs=1, max_num_batched_tokens=64, min_decode_batch=2)
    assert b.decode_sizes == [2]
    assert b.shape_for(1, 1) == StepShape(2, 2, True)
    assert b.shape_for(1, 1, extras=True) == StepShape(2, 2, True, extras=True)
    assert b.shape_for(1, 40) == StepShape(64, 1, False)
    assert b.mixed_rows(64) == [1]
    assert BucketPolicy(max_num_seqs=8, max_num_batched_tokens=64, min_decode_batch=2).decode_sizes == [2, 4, 8]


class _Compiles:
    """Records jax's compile events while active (the no-compile detector). Its listener is
    registered once and never cleared: clearing every listener would also remove the engine's own
    (``step_executables.compiles``, the ``compiles_while_serving`` metric)."""

    _active: list[list[str]] = []

    def __enter__(self) -> list[str]:
        self.events: list[str] = []
        self._active.append(self.events)
        return self.events

    @classmethod
    def listen(cls, event: str, *args, **kwargs) -> None:
        if "compile" in event:
            for events in cls._active:
                events.append(event)

    def __exit__(self, *exc) -> None:
        self._active.remove(self.events)


jax.monitoring.register_event_duration_secs_listener(_Compiles.listen)


def test_serving_a_varied_workload_compiles_nothing(lookback_model):
    eng = make_engine(lookback_model)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 300, size=n).tolist() for n in (1, 5, 31, 64, 2, 17)]
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, max_tokens=m, seed=s)
              for t, p, k, m, s in [(0, 1, 0, 3, None), (0.7, 0.9, 0, 9, 1), (1.0, 1, 5, 4, None),
                                    (0, 1, 0, 12, None), (1.3, 0.5, 3, 7, 2), (0.2, 1, 0, 2, None)]]
    with _Compiles() as compiles:
        eng.generate(prompts, params)
    assert compiles == []


def test_steps_in_fewer_rows_than_sequences_allowed_keep_greedy_tokens(lookback_model):
    # max_num_seqs 8: mixed steps of 16/32 tokens have 4 or 8 sequence (logits) rows. A lone prompt
    # runs in 4 rows, a burst of 6 in 8; the lookback model's tokens read the cache, so a wrong
    # logits row, position or slot in either changes them. Only the shapes the test needs are
    # compiled (the ready ones, 8/8 decode and 32/8 mixed, plus 32/4); other steps run in those.
    eng = make_engine(lookback_model, max_num_seqs=8, background_compile=True)
    eng.runner.stop_background()
    eng.runner.compile_all([StepShape(32, 4, False)])
    eng.runner.warm_up()
    seen: list[tuple[int, int, object]] = []
    host_inputs = eng.runner._host_inputs

    def spy(shape, scheduled, *args):
        seen.append((len(scheduled), sum(s.num_tokens for s in scheduled), shape))
        return host_inputs(shape, scheduled, *args)

    eng.runner._host_inputs = spy
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    lone = [list(range(40, 60))]
    burst = [[10, 20, 30], [100], [7, 8, 9, 250, 251], list(range(130, 137)), [5, 6], [77] * 9]
    try:
        assert eng.generate(lone, params) == [lookback_continue(p, 5) for p in lone]
        assert eng.generate(burst, params) == [lookback_continue(p, 5) for p in burst]
    finally:
        del eng.runner._host_inputs
    mixed = {shape for _, _, shape in seen if not shape.decode_only}
    assert StepShape(32, 4, False) in mixed and StepShape(32, 8, False) in mixed, mixed
    assert all(s.num_seqs >= n and s.num_tokens >= t for n, t, s in seen)


def test_the_compile_detector_detects_a_compile():
    with _Compiles() as compiles:
        jax.jit(lambda x: x * 3 + 1)(np.ones(37, np.float32)).block_until_ready()  # a shape never seen
    assert compiles != []


def _cache_copies(hlo: str, page_shape: tuple[int, ...]) -> list[str]:
    """HLO lines that copy (or convert) a whole KV-cache buffer, paged or flattened."""
    cache_dims = ",".join(map(str, page_shape))
    flat_dims = f"{page_shape[0] * page_shape[1]},{page_shape[2]},{page_shape[3]}"
    pattern = re.compile(rf"= [a-z0-9]+\[({cache_dims}|{flat_dims})\][^ ]* (copy|convert)\(")
    return [line for line in hlo.splitlines() if pattern.search(line)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_pages_are_updated_in_place(lookback_model, dtype):
    eng = make_engine(lookback_model, dtype=dtype)
    page_shape = eng.runner.kv_caches[0][0].shape
    for shape, executables in eng.runner._compiled.items():
        for compiled in executables:
            copies = _cache_copies(compiled.as_text(), page_shape)
            assert copies == [], f"{shape} copies the KV cache: {copies[:2]}"


def test_the_copy_detector_detects_a_copied_cache():
    pages = jax.ShapeDtypeStruct((64, 4, 2, 32), jax.numpy.float32)
    row = jax.ShapeDtypeStruct((2, 32), jax.numpy.float32)
    write = lambda p, r: p.at[3, 1].set(r)  # noqa: E731
    donated = jax.jit(write, donate_argnums=(0,)).lower(pages, row).compile()
    assert _cache_copies(donated.as_text(), pages.shape) == []
    copied = jax.jit(write).lower(pages, row).compile()  # not donated: XLA copies the whole cache first
    assert _cache_copies(copied.as_text(), pages.shape) != []
