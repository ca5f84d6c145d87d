"""Step results, without a device: tokens chosen by hand go through the scheduler, the detokenizer
and the one finish rule (``decide_finish``) exactly as the engine applies a step."""

from __future__ import annotations

import pytest

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.output_processor import OutputProcessor, RequestOutput
from jaxserve.engine.request_stats import RequestStats
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.step_results import EngineCounters, SampledTokens, StepResults, decide_finish
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tok(lookback_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(lookback_model))


def _drive(tok, params: SamplingParams, tokens: list[int], prompt: list[int] | None = None) -> list[RequestOutput]:
    """Run one request whose sampled tokens are ``tokens``, one step each, until it finishes."""
    sched = Scheduler(BlockManager(64, 4, enable_prefix_caching=True), max_num_seqs=2, max_num_batched_tokens=64)
    outputs = OutputProcessor(tok)
    results = StepResults(sched, outputs, EngineCounters(), RequestStats(64))
    req = Request("r", prompt or [5, 6, 7], params, max_tokens=params.max_tokens or 64, eos_token_ids=(EOS,))
    sched.add(req)
    outputs.add(req)
    got: list[RequestOutput] = []
    for t in tokens:
        got += results.apply(results.launch(sched.schedule()), SampledTokens([t]))
        if req.status.finished:
            break
    assert sched.block_manager.num_used_blocks == (0 if req.status.finished else len(req.block_ids))
    return got


def _req(**kw) -> Request:
    return Request("r", [1], SamplingParams(**kw), max_tokens=kw.get("max_tokens") or 10, eos_token_ids=(EOS,))


def test_decide_finish_is_the_one_rule():
    fin = decide_finish
    assert fin(_req(), 1, EOS, None).status is RequestStatus.FINISHED_STOPPED
    assert fin(_req(), 1, EOS, None).stop_reason is None
    assert fin(_req(ignore_eos=True), 1, EOS, None) is None
    assert fin(_req(stop_token_ids=(9,)), 3, 9, None).stop_reason == 9
    assert fin(_req(ignore_eos=True, stop_token_ids=(EOS,)), 3, EOS, None).stop_reason == EOS
    assert fin(_req(), 2, 40, "ab").stop_reason == "ab"
    assert fin(_req(max_tokens=5), 5, 40, None).status is RequestStatus.FINISHED_LENGTH
    assert fin(_req(max_tokens=5), 4, 40, None) is None
    # Below min_tokens no stop ends a request; the length limit still does.
    for kw in ({}, {"stop_token_ids": (9,)}):
        r = _req(min_tokens=4, max_tokens=4, **kw)
        assert fin(r, 3, 9 if kw else EOS, "ab") is None
        assert fin(r, 4, 9 if kw else EOS, None).status is RequestStatus.FINISHED_STOPPED
    assert fin(_req(min_tokens=4, max_tokens=4), 4, 40, None).status is RequestStatus.FINISHED_LENGTH


def test_results_resolve_free_and_count(tok):
    outs = _drive(tok, SamplingParams(max_tokens=3), [40, 41, 42, 43])
    assert [o.new_token_ids for o in outs] == [[40], [41], [42]]
    assert [o.num_output_tokens for o in outs] == [1, 2, 3]
    assert outs[-1].finished and outs[-1].finish_reason == "length" and not outs[0].finished
    assert "".join(o.new_text for o in outs) == tok.decode([40, 41, 42])


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_three_tokens_in_multibyte_text(tok, include):
    text = "Él habló en español, café, naïve, 日本語のテキスト and symbols"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = enc["input_ids"]
    start = text.index("本")
    stop = text[start : start + 5]  # 本語のテキ: 15 UTF-8 bytes
    spanned = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < start + len(stop) and b > start]
    assert len(spanned) >= 3, "the stop string must span three tokens or more"
    params = SamplingParams(max_tokens=64, stop=("zzz", stop), include_stop_str_in_output=include)
    outs = _drive(tok, params, ids + [40] * 10)
    assert outs[-1].finished and (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", stop)
    assert len(outs) <= spanned[-1] + 1  # it ends with the token that completes the stop string
    assert all("\ufffd" not in o.new_text for o in outs)
    assert "".join(o.new_text for o in outs) == text[: start + (len(stop) if include else 0)]


def test_min_tokens_defers_stop_strings_and_eos(tok):
    ids = tok.encode("ab ab ab ab", add_special_tokens=False)
    outs = _drive(tok, SamplingParams(max_tokens=30, stop=("ab",), min_tokens=len(ids) + 1), ids + [EOS, 40])
    # "ab" shows up at once, but only a stop at min_tokens outputs or later counts: here EOS.
    assert outs[-1].finish_reason == "stop" and outs[-1].new_token_ids == [EOS] and outs[-1].stop_reason is None
    assert outs[-1].num_output_tokens == len(ids) + 1
    assert "".join(o.new_text for o in outs) == "ab ab ab ab"
    # With min_tokens = the number of "ab" tokens, the last one is a stop at the limit.
    outs = _drive(tok, SamplingParams(max_tokens=30, stop=("ab",), min_tokens=len(ids)), ids + [EOS])
    assert outs[-1].stop_reason == "ab" and outs[-1].num_output_tokens == len(ids)
    assert "".join(o.new_text for o in outs) == "ab ab ab "


class _Sequence:
    """A grammar that accepts exactly ``tokens`` (the ``request.Grammar`` protocol, by hand)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.pos, self.error = tokens, 0, ""

    def consume(self, token: int) -> bool:
        ok = self.pos < len(self.tokens) and self.tokens[self.pos] == token
        self.pos += 1
        self.error = "" if ok else f"unexpected {token}"
        return ok

    @property
    def done(self) -> bool:
        return self.pos >= len(self.tokens) or bool(self.error)


def _drive_grammar(tok, params: SamplingParams, tokens: list[int], grammar: _Sequence) -> list[RequestOutput]:
    sched = Scheduler(BlockManager(64, 4, enable_prefix_caching=True), max_num_seqs=2, max_num_batched_tokens=64)
    outputs = OutputProcessor(tok)
    results = StepResults(sched, outputs, EngineCounters(), RequestStats(64))
    req = Request("r", [5, 6, 7], params, max_tokens=params.max_tokens or 64, eos_token_ids=(EOS,))
    req.grammar = grammar
    sched.add(req)
    outputs.add(req)
    got: list[RequestOutput] = []
    for t in tokens:
        got += results.apply(results.launch(sched.schedule()), SampledTokens([t]))
        if req.status.finished:
            break
    assert req.status.finished and sched.block_manager.num_used_blocks == 0
    return got


def test_a_complete_grammar_stops_the_request_at_once_even_below_min_tokens(tok):
    g = _Sequence([40, 41])
    got = _drive_grammar(tok, SamplingParams(min_tokens=5, ignore_eos=True), [40, 41, 42, 43], g)
    assert [o.new_token_ids for o in got] == [[40], [41]] and g.pos == 2
    assert got[-1].finish_reason == "stop" and got[-1].num_output_tokens == 2


def test_no_allowed_token_finishes_with_stop_and_no_token(tok, caplog):
    from jaxserve.request import NO_TOKEN

    got = _drive_grammar(tok, SamplingParams(min_tokens=5), [40, NO_TOKEN], _Sequence([40, 41, 42]))
    assert [o.new_token_ids for o in got] == [[40], []]
    assert got[-1].finished and got[-1].finish_reason == "stop" and got[-1].num_output_tokens == 1
    assert "no token is allowed by its grammar once min_tokens masks EOS" in caplog.text
