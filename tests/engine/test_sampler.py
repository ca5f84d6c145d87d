"""On-device sampling: filters against numpy, seeds, greedy, and sampled frequencies."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve.engine.logits_processors import build_logits_extras
from jaxserve.engine.sampler import _filter_probs, build_sampling_tensors, sample
from jaxserve.sampling_params import SamplingParamError, SamplingParams

_sample_jit = jax.jit(sample)


def _sample(logits, st):
    """Tokens only, no logits processors (zero-width extras)."""
    extras = build_logits_extras([], len(st.temperature), with_extras=False, history_len=0)
    return _sample_jit(logits, st, extras)[0]


def _st(params, seeds=None, steps=None):
    n = len(params)
    return build_sampling_tensors(params, seeds or [0] * n, steps or [0] * n, n)


def _np_filter(p: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for rank, i in enumerate(order):
        if (top_k > 0 and rank >= top_k) or mass >= top_p:
            break
        keep[i] = True
        mass += p[i]
    keep = p >= p[keep].min()  # ties at the cut are kept
    keep &= p >= min_p * p.max()
    return np.where(keep, p, 0.0)


@pytest.mark.parametrize("top_k,top_p,min_p", [(3, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (5, 0.5, 0.05), (1, 1.0, 0.0),
                                               (20, 1.0, 0.0), (0, 0.3, 0.0)])
def test_filters_match_numpy(top_k, top_p, min_p):
    rng = np.random.RandomState(0)
    probs = rng.dirichlet(np.ones(50) * 0.5, size=3).astype(np.float32)
    probs[2] = rng.dirichlet(np.ones(50) * 0.05)  # a peaked row
    probs[1, :10] = probs[1, 10:20]  # ties at the cuts are kept
    probs /= probs.sum(-1, keepdims=True)
    st = _st([SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)] * 3)
    got = np.asarray(jax.jit(_filter_probs)(jax.numpy.asarray(probs), st))
    for row in range(3):
        np.testing.assert_allclose(got[row], _np_filter(probs[row], top_k, top_p, min_p), rtol=1e-6)


def test_filters_leave_rows_without_filters_alone():
    probs = np.random.RandomState(5).dirichlet(np.ones(40), size=3).astype(np.float32)
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0), SamplingParams(temperature=0, top_k=2)]
    got = np.asarray(_filter_probs(jax.numpy.asarray(probs), _st(params)))
    np.testing.assert_allclose(got[0], _np_filter(probs[0], 2, 1.0, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(got[1:], probs[1:])  # no filter asked; greedy rows ignore theirs


def test_greedy_rows_take_argmax_and_mix_with_random_rows():
    logits = np.random.RandomState(1).randn(4, 100).astype(np.float32)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_k=1)]
    out = np.asarray(_sample(logits, _st(params, seeds=[0, 3, 0, 9])))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert out[3] == logits[3].argmax()  # top_k = 1 is greedy whatever the temperature


def test_seed_reproducible_independent_of_batch_and_step_dependent():
    logits = np.random.RandomState(2).randn(6, 1000).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = np.asarray(_sample(logits[:1], _st([p], seeds=[42], steps=[5])))[0]
    batch = [SamplingParams(temperature=1.0)] * 6
    seeds = [1, 2, 3, 42, 4, 5]  # the seeded row moves to row 3, among other rows
    in_batch = np.asarray(_sample(np.roll(logits, 3, axis=0), _st(batch, seeds=seeds, steps=[5] * 6)))[3]
    assert alone == in_batch
    draws = {int(np.asarray(_sample(logits[:1], _st([p], seeds=[42], steps=[s])))[0]) for s in range(20)}
    assert len(draws) > 5  # the counter advances the stream


def test_sampled_frequencies_follow_the_distribution():
    probs = np.array([0.5, 0.25, 0.15, 0.1], np.float32)
    logits = np.tile(np.log(probs), (4000, 1))
    params = [SamplingParams(temperature=1.0)] * 4000
    out = np.asarray(_sample(logits, _st(params, seeds=list(range(4000)))))
    freq = np.bincount(out, minlength=4) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)
    # temperature 0.5 sharpens: p^2 renormalised
    out = np.asarray(_sample(logits, _st([SamplingParams(temperature=0.5)] * 4000, seeds=list(range(4000)))))
    sharp = probs**2 / (probs**2).sum()
    np.testing.assert_allclose(np.bincount(out, minlength=4) / 4000, sharp, atol=0.03)


def test_invalid_params_name_the_field():
    with pytest.raises(SamplingParamError) as e:
        SamplingParams(temperature=3.0)
    assert e.value.param == "temperature"
    with pytest.raises(SamplingParamError) as e:
        SamplingParams(top_p=0.0)
    assert e.value.param == "top_p"


def test_logprobs_are_raw_model_log_softmax():
    logits = np.random.RandomState(5).randn(3, 64).astype(np.float32)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.8, seed=1, logprobs=0),
              SamplingParams(temperature=0)]
    st = _st(params, seeds=[0, 1, 0])
    extras = build_logits_extras([], 3, with_extras=False, history_len=0)
    tokens, lp = _sample_jit(logits, st, extras)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = np.asarray(tokens)
    np.testing.assert_allclose(np.asarray(lp.sampled), ref[np.arange(3), tokens], atol=1e-5)
    order = np.argsort(-ref, axis=-1)[:, :20]
    np.testing.assert_array_equal(np.asarray(lp.top_ids), order)
    np.testing.assert_allclose(np.asarray(lp.top_vals), np.take_along_axis(ref, order, -1), atol=1e-5)


def test_first_argmax_matches_numpy_including_ties():
    from jaxserve.engine.sampler import first_argmax

    rng = np.random.RandomState(4)
    x = rng.randint(0, 5, size=(8, 300)).astype(np.float32)  # many ties
    x[1, 7], x[2, 299], x[3, 130], x[3, 200] = 9, 9, 9, 9  # maxima in the first, last (partial) and a middle block
    x[4] = -np.inf
    x[5, 140] = np.nan  # a NaN row gives the last index
    want = np.argmax(x, axis=-1)
    want[5] = 299
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(x)), want)
    y = rng.standard_normal((3, 49152)).astype(np.float32)  # the served vocabulary's size
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(y)), np.argmax(y, axis=-1))


def test_inverse_cdf_matches_a_flat_cumulative_sum():
    from jaxserve.engine.sampler import _inverse_cdf

    rng = np.random.RandomState(6)
    probs = rng.dirichlet(np.ones(300) * 0.3, size=6).astype(np.float32)  # 300: a partial last block
    probs[1, :200] = 0.0  # leading zero blocks: u = 0 lands on the first non-zero entry
    probs[1] /= probs[1].sum()
    u = rng.uniform(size=6).astype(np.float32)
    u[1], u[2], u[3] = 0.0, 0.999999, 0.5
    cum = np.cumsum(probs.astype(np.float64), axis=-1)
    want = np.minimum((cum <= (u * cum[:, -1])[:, None]).sum(-1), 299)
    np.testing.assert_array_equal(np.asarray(jax.jit(_inverse_cdf)(probs, u)), want)
    assert want[1] == np.flatnonzero(probs[1])[0]
