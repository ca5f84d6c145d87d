"""Penalty steps stay asynchronous: a penalty row's in-flight output token is read on device, and
its outputs equal a hand-computed greedy run of the lookback model (``tests.helpers``).

Each request biases one token X so that it wins once, and the penalties then push it below the
model's own choice: if the history lagged a step (X missing from it), X would win twice in a row.
"""

from __future__ import annotations

import numpy as np

from jaxserve.sampling_params import SamplingParams, StructuredOutput
from tests.engine.engine_helpers import make_engine
from tests.helpers import lookback_levels, lookback_logit_scale

N = 8
CASES = [  # prompt, logit_bias, presence, frequency, repetition
    ([10, 20, 30], ((200, 33.0),), 2.0, 0.0, 1.0),
    ([50, 51], ((7, 34.0),), 0.5, 1.5, 1.2),
]


def _reference(prompt: list[int], bias: tuple, presence: float, frequency: float, repetition: float,
               *, lag: bool = False) -> list[int]:
    """Greedy with vLLM's bias/penalty semantics on the lookback model's exact logits; ``lag``: the
    history misses the last output (what a step that read a stale history would compute)."""
    scale, seq, out = lookback_logit_scale(), list(prompt), []
    for _ in range(N):
        logits = scale * lookback_levels(seq[-1], seq[-2] if len(seq) > 1 else seq[-1])
        for t, v in bias:
            logits[t] += v
        hist = out[:-1] if lag and out else out
        for t in set(prompt) | set(hist):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(hist):
            logits[t] -= frequency * hist.count(t) + presence
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 0.5, "the reference must not hinge on a near tie"
        out.append(int(np.argmax(logits)))
        seq.append(out[-1])
    return out


def _params(bias: tuple, presence: float, frequency: float, repetition: float) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, logit_bias=bias, presence_penalty=presence,
                          frequency_penalty=frequency, repetition_penalty=repetition)


def _run_async(eng, requests: list[tuple[list[int], SamplingParams]]) -> tuple[list[list[int]], int]:
    """Outputs of one batch, and how many steps returned with a penalty row's token still in flight."""
    ids = [f"pen-{i}" for i in range(len(requests))]
    for rid, (prompt, p) in zip(ids, requests, strict=True):
        eng.add_request(rid, prompt, p)
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    overlapped = 0
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id].extend(out.new_token_ids)
        overlapped += any(r.num_pending and r.params.has_penalties for r in eng.requests.values())
    return [got[rid] for rid in ids], overlapped


def test_the_references_detect_a_lagging_history():
    for prompt, *rest in CASES:
        assert _reference(prompt, *rest) != _reference(prompt, *rest, lag=True)


def test_penalty_steps_stay_async_and_match_the_hand_computed_tokens(lookback_model):
    eng = make_engine(lookback_model)
    assert eng.async_scheduling
    got, overlapped = _run_async(eng, [(p, _params(*rest)) for p, *rest in CASES])
    assert got == [_reference(p, *rest) for p, *rest in CASES]
    assert overlapped >= N - 2  # the next step was dispatched before the previous tokens reached the host


def test_penalties_beside_a_grammar_row_use_the_applied_token(lookback_model):
    # A grammar step samples after the previous step is applied: its histories are completed on the host.
    eng = make_engine(lookback_model)
    grammar = SamplingParams(temperature=0, max_tokens=N, structured=StructuredOutput("regex", "[ab]{20}"))
    (prompt, *rest), = CASES[:1]
    got, _ = _run_async(eng, [(prompt, _params(*rest)), (eng.tokenizer.encode("a"), grammar)])
    assert got[0] == _reference(prompt, *rest)
