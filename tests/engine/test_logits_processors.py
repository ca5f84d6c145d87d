"""Logit bias, min_tokens masking and presence / frequency / repetition penalties against numpy."""

from __future__ import annotations

import jax
import numpy as np

from jaxserve.engine.logits_processors import apply_logits_processors, build_logits_extras, needs_extras
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams

V = 12
_apply = jax.jit(apply_logits_processors)


def _req(prompt, out, **kw) -> Request:
    r = Request("r", prompt, SamplingParams(**kw), max_tokens=50, eos_token_ids=(2,))
    r.output_token_ids = list(out)
    return r


def _run(reqs, logits):
    ex = build_logits_extras(reqs, len(reqs), with_extras=True, history_len=16)
    return np.asarray(_apply(logits, ex))


def test_logit_bias_adds_to_named_tokens():
    logits = np.zeros((1, V), np.float32)
    got = _run([_req([1], [], logit_bias=((3, 5.0), (7, -100.0)))], logits)
    want = np.zeros(V)
    want[3], want[7] = 5.0, -100.0
    np.testing.assert_allclose(got[0], want)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = np.ones((2, V), np.float32)
    below = _req([1], [4], min_tokens=3, stop_token_ids=(9,))
    reached = _req([1], [4, 5, 6], min_tokens=3, stop_token_ids=(9,))
    got = _run([below, reached], logits)
    assert np.isneginf(got[0, 2]) and np.isneginf(got[0, 9]) and got[0, 3] == 1.0
    assert needs_extras(below) and not needs_extras(reached)
    ignore = _req([1], [], min_tokens=2, ignore_eos=True, stop_token_ids=(9,))
    got = _run([ignore], logits)
    assert got[0, 2] == 1.0 and np.isneginf(got[0, 9])  # with ignore_eos, EOS is not a stop token


def test_penalties_match_vllm_semantics():
    rng = np.random.RandomState(0)
    logits = rng.randn(1, V).astype(np.float32) * 3
    prompt, out = [1, 3, 3], [3, 5, 5, 5]
    got = _run([_req(prompt, out, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5)], logits)
    want = logits[0].copy()
    for t in set(prompt) | set(out):  # repetition: prompt and output tokens
        want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
    for t in set(out):  # frequency and presence: output tokens only
        want[t] -= 0.25 * out.count(t) + 0.5
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_penalties_move_the_distribution_the_right_way():
    logits = np.zeros((3, V), np.float32)
    logits[:, 5] = 2.0
    reqs = [_req([1], [5, 5], presence_penalty=1.0), _req([1], [5, 5], frequency_penalty=-1.0),
            _req([5], [], repetition_penalty=2.0)]
    got = _run(reqs, logits)
    assert got[0, 5] == 1.0  # presence lowers a seen token once
    assert got[1, 5] == 4.0  # negative frequency raises it per occurrence
    assert got[2, 5] == 1.0  # repetition > 1 divides a positive logit


def test_zero_width_extras_change_nothing():
    logits = np.random.RandomState(1).randn(2, V).astype(np.float32)
    ex = build_logits_extras([_req([1], [], logit_bias=((3, 5.0),))] * 2, 2, with_extras=False, history_len=16)
    np.testing.assert_array_equal(np.asarray(_apply(logits, ex)), logits)
