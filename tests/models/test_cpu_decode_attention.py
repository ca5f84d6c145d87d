"""The ``cpu`` backend's grouped decode attention against the jnp reference, and in the engine."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.models import attention_backends
from jaxserve.models.attention import build_host_metadata
from jaxserve.models.attention_backends import SPLIT_REFERENCE, CpuBackend
from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.engine.test_compilation import _cache_copies
from tests.helpers import lookback_continue

N, K, H, PAGE, PAGES = 6, 2, 32, 8, 128
# Decode rows of very different lengths (one to three of the reference's 128-token chunks), two
# padding rows (last, as the engine packs them), pages scattered over the cache.
SEQ_LENS = [300, 3, 133, 1, 17, 9]
ROWS = 8


def _step(backend, seed: int) -> tuple[np.ndarray, tuple]:
    """A decode step of ``SEQ_LENS`` over a cache whose every slot outside the sequences holds NaN."""
    rng = np.random.RandomState(seed)
    perm = rng.permutation(np.arange(1, PAGES))
    cache = np.full((2, PAGES * PAGE, K, H), np.nan, np.float32)
    tables, used = [], 0
    for n in SEQ_LENS:
        pages = perm[used:used + -(-n // PAGE)]
        used += len(pages)
        tables.append(pages.tolist())
        slots = pages[np.arange(n - 1) // PAGE] * PAGE + np.arange(n - 1) % PAGE  # the new token is written
        cache[:, slots] = rng.randn(2, n - 1, K, H)
    meta = build_host_metadata([1] * len(SEQ_LENS), SEQ_LENS, tables, PAGE, num_tokens=ROWS, num_seqs=ROWS,
                               table_width=40, decode_only=True)
    cache = cache.reshape(2, PAGES, PAGE, K, H)
    q = jnp.asarray(rng.randn(ROWS, N, H), jnp.float32)
    k, v = (jnp.asarray(rng.randn(ROWS, K, H), jnp.float32) for _ in range(2))
    o, new = jax.jit(functools.partial(backend.forward, sm_scale=H**-0.5))(q, k, v, tuple(jnp.asarray(cache)), meta)
    return np.asarray(o), tuple(np.asarray(x) for x in new)


def test_grouped_decode_equals_the_reference(monkeypatch):
    calls = []
    grouped = attention_backends.grouped_decode_attention
    monkeypatch.setattr(attention_backends, "grouped_decode_attention",
                        lambda *a, **kw: calls.append(kw["groups"]) or grouped(*a, **kw))
    for groups in (2, 4):
        backend = CpuBackend("cpu_test", "reference", decode_groups=groups, group_min_rows=8, use_kernel=False)
        got, got_cache = _step(backend, seed=groups)
        want, want_cache = _step(SPLIT_REFERENCE, seed=groups)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(got)) and not np.any(got[len(SEQ_LENS):])  # padding rows: zero
        for g, w in zip(got_cache, want_cache, strict=True):
            np.testing.assert_array_equal(g[1:], w[1:])  # page 0: padding writes, unspecified
    assert calls == [2, 4]  # the grouped path ran (8 rows >= group_min_rows)


def test_grouped_decode_in_the_engine(lookback_model, monkeypatch):
    """Decode steps of 3-4 rows grouped in pairs (``group_min_rows`` lowered to 4 while the engine
    compiles), contexts from 2 to 180 tokens: the greedy tokens follow the lookback rule."""
    calls = []
    grouped = attention_backends.grouped_decode_attention
    monkeypatch.setattr(attention_backends, "grouped_decode_attention",
                        lambda *a, **kw: calls.append(kw["groups"]) or grouped(*a, **kw))
    monkeypatch.setitem(attention_backends.BACKENDS, "cpu", CpuBackend("cpu", "reference", group_min_rows=4, use_kernel=False))
    eng = make_engine(lookback_model, max_model_len=252)  # a config no other test shares: its own engine
    model = nnx.merge(eng.runner.loaded.graphdef, eng.runner.loaded.state)
    assert model.layers[0].self_attn.backend == "cpu" and calls  # auto on CPU; the grouped path was traced
    grouped_steps = [exe for shape, exes in eng.runner._compiled.items() if shape.decode_only and shape.num_seqs >= 4
                     for exe in exes]
    assert grouped_steps and all(_cache_copies(exe.as_text(), eng.runner.kv_caches[0][0].shape) == []
                                 for exe in grouped_steps)  # the caches are still updated in place
    rng = np.random.RandomState(5)
    prompts = [rng.randint(3, 300, size=n).tolist() for n in (1, 170, 40, 129, 7, 90, 2, 150)]
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert outs == [lookback_continue(p, 10) for p in prompts]
    assert eng.scheduler.block_manager.num_used_blocks == 0
