"""An internal fault inside one request's processing fails that request alone; the others in the same
batches finish with their exact (hand-computed) outputs and every KV block is freed.

Faults are injected into the detokenizer (output processing), the logits-processor inputs built for
a step, and a grammar matcher, each for one request among several running concurrently.
"""

from __future__ import annotations

import pytest

from jaxserve.engine import model_runner
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.output_processor import RequestOutput
from jaxserve.sampling_params import SamplingParams, StructuredOutput
from tests.engine.engine_helpers import make_engine
from tests.helpers import lookback_continue

GOOD = {"a": [10, 20, 30], "b": list(range(40, 90)), "c": [7] * 33}
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _run(eng: LLMEngine, bad_params: SamplingParams = PARAMS) -> dict[str, list[RequestOutput]]:
    for rid, prompt in GOOD.items():
        eng.add_request(rid, prompt, PARAMS)
    eng.add_request("bad", [5, 6, 7], bad_params)
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(200):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            outs.setdefault(out.request_id, []).append(out)
    assert not eng.has_unfinished()
    return outs


def _assert_only_bad_failed(eng: LLMEngine, outs: dict[str, list[RequestOutput]], cause: str) -> None:
    for rid, prompt in GOOD.items():
        assert all(o.error is None for o in outs[rid])
        assert [t for o in outs[rid] for t in o.new_token_ids] == lookback_continue(prompt, 8)
        assert outs[rid][-1].finish_reason == "length"
    last = outs["bad"][-1]
    assert last.finished and last.finish_reason == "error" and cause in last.error
    assert sum(o.finished for o in outs["bad"]) == 1
    assert eng.scheduler.block_manager.num_used_blocks == 0 and not eng.requests


def test_detokenizer_fault(lookback_model, monkeypatch):
    eng = make_engine(lookback_model)
    real = eng.outputs.update_text

    def update_text(req, ids, *, check_stops):
        if req.request_id == "bad" and req.num_output_tokens >= 3:
            raise RuntimeError("injected detokenizer fault")
        return real(req, ids, check_stops=check_stops)

    monkeypatch.setattr(eng.outputs, "update_text", update_text)
    outs = _run(eng)
    _assert_only_bad_failed(eng, outs, "injected detokenizer fault")
    assert len(outs["bad"]) >= 2  # tokens first, then the failure


def test_logits_processor_fault(lookback_model, monkeypatch):
    """The bad request's logits-processor rows cannot be built: its step is rebuilt without it."""
    eng = make_engine(lookback_model)
    real = model_runner.build_logits_extras

    def build(reqs, *args, **kwargs):
        if any(r.request_id == "bad" for r in reqs):
            raise ValueError("injected logits-processor fault")
        return real(reqs, *args, **kwargs)

    monkeypatch.setattr(model_runner, "build_logits_extras", build)
    outs = _run(eng, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias=((3, 1.0),)))
    _assert_only_bad_failed(eng, outs, "injected logits-processor fault")


def test_grammar_matcher_fault(lookback_model):
    eng = make_engine(lookback_model)

    def consume(token: int) -> bool:
        raise RuntimeError("injected grammar fault")

    for rid, prompt in GOOD.items():
        eng.add_request(rid, prompt, PARAMS)
    bad = eng.add_request("bad", [5, 6, 7], SamplingParams(temperature=0, max_tokens=8,
                                                           structured=StructuredOutput("regex", "[a-z]+")))
    bad.grammar.consume = consume
    outs: dict[str, list[RequestOutput]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            outs.setdefault(out.request_id, []).append(out)
    _assert_only_bad_failed(eng, outs, "injected grammar fault")


def test_a_fault_no_request_explains_still_stops_the_step(lookback_model, monkeypatch):
    """The twin: a device-step failure is not blamed on a request; it propagates (the loop dies)."""
    eng = make_engine(lookback_model)

    def broken(*args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(eng.runner, "_run", broken)
    eng.add_request("x", [1, 2, 3], PARAMS)
    with pytest.raises(RuntimeError, match="device fell over"):
        eng.step()
    monkeypatch.undo()
    eng.abort("x")
    assert eng.scheduler.block_manager.num_used_blocks == 0
