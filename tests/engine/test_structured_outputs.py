"""Structured outputs in the engine: a tiny random-weight model sampled under grammars always
produces valid text (checked by hand-written validators, not by llguidance), a cut reply is a
valid prefix, compile errors name the problem, and steps without a grammar row are untouched."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from jaxserve.engine.compilation import BucketPolicy, StepShape
from jaxserve.engine.step_functions import program_key
from jaxserve.engine.grammar import GrammarError
from jaxserve.engine.sampler import apply_grammar_mask, build_sampling_tensors, sample
from jaxserve.engine.logits_processors import build_logits_extras
from jaxserve.request import NO_TOKEN, Request
from jaxserve.sampling_params import SamplingParams, StructuredOutput
from tests.engine.engine_helpers import make_engine


def _obj(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = {
    "enum": _obj({"color": {"enum": ["red", "green", "blue"]}}, ["color"]),
    "nested": _obj({
        "user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 999},
                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                               "minItems": 1, "maxItems": 3}}, ["id", "tags"]),
        "ok": {"type": "boolean"},
    }, ["user", "ok"]),
    "ranges": _obj({"n": {"type": "integer", "minimum": -20, "maximum": 50},
                    "k": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9}}, ["n", "k"]),
    "pattern": _obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                     "note": {"type": "string", "maxLength": 4}}, ["code"]),
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
}


def _valid_json(name: str, v) -> bool:
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if name == "enum":
        return v == {"color": v.get("color")} and v["color"] in ("red", "green", "blue")
    if name == "nested":
        u = v["user"]
        return (set(v) == {"user", "ok"} and isinstance(v["ok"], bool) and set(u) == {"id", "tags"}
                and is_int(u["id"]) and 1 <= u["id"] <= 999 and 1 <= len(u["tags"]) <= 3
                and all(isinstance(t, str) and len(t) <= 3 for t in u["tags"]))
    if name == "ranges":
        return set(v) == {"n", "k"} and is_int(v["n"]) and -20 <= v["n"] <= 50 and is_int(v["k"]) and 0 < v["k"] <= 9
    if name == "pattern":
        return (set(v) in ({"code"}, {"code", "note"}) and re.fullmatch(r"[A-Z]{2}-[0-9]{3}", v["code"]) is not None
                and len(v.get("note", "")) <= 4)
    if name == "array":
        return 2 <= len(v) <= 4 and all(is_int(x) and 0 <= x <= 9 for x in v)
    raise AssertionError(name)


REGEX = r"(yes|no), [a-z]{2,5}!"
CHOICES = ["alpha", "beta", "gamma delta"]
LARK = 'start: pair ("," pair)?\npair: KEY "=" NUM\nKEY: /[a-z]{1,4}/\nNUM: /[0-9]{1,3}/\n'
GBNF = 'root ::= "x" [0-9] [0-9]?'
SAMPLES = 5  # per constraint


def _run(engine, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, str]]:
    """(text, finish_reason) per request, all in one batch."""
    ids = [f"so-{i}" for i in range(len(requests))]
    for rid, (prompt, p) in zip(ids, requests, strict=True):
        engine.add_request(rid, prompt, p)
    text = dict.fromkeys(ids, "")
    finish: dict[str, str] = {}
    while len(finish) < len(ids):
        for out in engine.step():
            text[out.request_id] += out.new_text
            if out.finished:
                finish[out.request_id] = out.finish_reason
    return [(text[r], finish[r]) for r in ids]


KV_BLOCKS = 96  # 384 tokens: four requests of ~130 tokens cannot all hold their blocks (preemption)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny Qwen2 with random weights (``--load-format dummy``: no torch needed), a byte-level BPE,
    async scheduling and a KV cache small enough that long requests preempt each other."""
    from tests.helpers import hf_config, write_tiny_tokenizer

    d = tmp_path_factory.mktemp("structured")
    cfg = hf_config("qwen2")
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(d)
    write_tiny_tokenizer(d)
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers x (K, V) x block_size x KV heads x head_dim x float32
    eng = make_engine(d, load_format="dummy", kv_cache_memory_gib=KV_BLOCKS * block_bytes / 2**30)
    assert eng.async_scheduling and eng.scheduler.block_manager.num_usable_blocks < KV_BLOCKS
    return eng


def test_every_sample_matches_its_schema_regex_choice_or_grammar(engine):
    specs = [(f"json:{n}", StructuredOutput("json_schema", json.dumps(s))) for n, s in SCHEMAS.items()]
    specs += [("regex", StructuredOutput("regex", REGEX)), ("choice", StructuredOutput("choice", json.dumps(CHOICES))),
              ("lark", StructuredOutput("grammar", LARK)), ("gbnf", StructuredOutput("grammar", GBNF))]
    prompt = engine.tokenizer.encode("Give me data:")
    reqs = [(prompt, SamplingParams(max_tokens=120, temperature=1.0, seed=1000 * k + i, structured=spec))
            for k, (_, spec) in enumerate(specs) for i in range(SAMPLES)]
    results = _run(engine, reqs)
    for k, (name, _) in enumerate(specs):
        for text, finish in results[k * SAMPLES : (k + 1) * SAMPLES]:
            assert finish == "stop", (name, text, finish)
            if name.startswith("json:"):
                assert _valid_json(name[5:], json.loads(text)), (name, text)
            elif name == "regex":
                assert re.fullmatch(REGEX, text), text
            elif name == "choice":
                assert text in CHOICES, text
            elif name == "lark":
                assert re.fullmatch(r"[a-z]{1,4}=[0-9]{1,3}(,[a-z]{1,4}=[0-9]{1,3})?", text), text
            else:
                assert re.fullmatch(r"x[0-9]{1,2}", text), text
    # Sampling is not degenerate: the samples of a constraint differ.
    assert len({t for t, _ in results[:SAMPLES]}) > 1 or len({t for t, _ in results[SAMPLES : 2 * SAMPLES]}) > 1


def test_a_reply_cut_by_max_tokens_is_a_valid_prefix(engine):
    spec = StructuredOutput("regex", "[ab]{40}x")
    prompt = engine.tokenizer.encode("ab")
    results = _run(engine, [(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=i, structured=spec))
                            for i in range(3)])
    for text, finish in results:
        assert finish == "length" and re.fullmatch("[ab]+", text), (text, finish)


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(engine):
    prompt = engine.tokenizer.encode("hello")
    plain = SamplingParams(max_tokens=8, temperature=0.0)
    alone = _run(engine, [(prompt, plain)])
    mixed = _run(engine, [(prompt, plain), (prompt, SamplingParams(max_tokens=8, structured=StructuredOutput(
        "choice", json.dumps(CHOICES))))])
    assert mixed[0] == alone[0]


def test_compile_errors_name_the_problem(engine):
    cases = [
        (StructuredOutput("json_schema", json.dumps({"type": "array", "uniqueItems": True}), param="guided_json"),
         "uniqueItems"),
        (StructuredOutput("json_schema", json.dumps({"type": "strin"})), "strin"),
        (StructuredOutput("regex", "a(b", param="guided_regex"), "unclosed group"),
        (StructuredOutput("grammar", "start: undefined_rule"), "undefined_rule"),
    ]
    for spec, needle in cases:
        with pytest.raises(GrammarError, match=needle) as err:
            engine.add_request("bad", [1, 2], SamplingParams(structured=spec))
        assert err.value.param == spec.param
    assert not engine.has_unfinished()


def test_grammar_shapes_share_executables_and_other_steps_carry_no_mask(engine):
    policy = BucketPolicy(4, 32)
    shapes = policy.all_shapes()
    grammar = [s for s in shapes if s.grammar]
    assert [(s.num_tokens, s.extras) for s in grammar] == [(1, False), (2, False), (4, False), (4, True), (32, True)]
    assert policy.shape_for(1, 1) == next(s for s in shapes if s.num_seqs == 1)  # unchanged
    runner = engine.runner
    assert runner.compiled_shapes == shapes
    for shape in runner.compiled_shapes:
        mask = runner._abstract_inputs(shape)[7]  # tokens, prev_idx, positions, meta, logits_idx, sampling, extras, mask
        assert mask.shape == (shape.num_seqs, 10 if shape.grammar else 0)  # ceil(320 / 32) words
        # One fused executable per shape; a grammar shape is a forward and a sample executable.
        assert len(runner._compiled[shape]) == (2 if shape.grammar else 1)
    # Grammar shapes' forwards depend on (T, B), their samplings on (B, extras): 4 forwards, 4 samplings.
    assert runner.num_executables == len(shapes) - len(grammar) + 4 + 4
    # Sharing never merges a decode step with a prefill step of the same sizes (static decode_only).
    (decode,), (mixed,) = (runner.programs(StepShape(4, 4, d)) for d in (True, False))
    assert program_key(*decode) != program_key(*mixed)
    # The mask's unpacking ([B, W, 32] bits) is traced only into grammar steps' sampling: the detector and its twin.
    plain = next(s for s in runner.compiled_shapes if s.extras and s.decode_only and not s.grammar)
    twin = next(s for s in runner.compiled_shapes if s.grammar and s.decode_only and s.num_seqs == 4)
    assert "tensor<4x10x32xi32>" not in runner.lower(plain)[0].as_text()
    forward, sample_step = runner.lower(twin)
    assert "tensor<4x10x32xi32>" in sample_step.as_text() and "tensor<4x10x32xi32>" not in forward.as_text()


def test_mask_unpacks_bit_t_of_word_t_over_32():
    v = 70
    mask = np.zeros((2, 3), np.int32)
    allowed = [0, 31, 32, 69]
    for t in allowed:
        mask[0, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    mask[1] = -1
    out = np.asarray(jax.jit(apply_grammar_mask)(np.zeros((2, v), np.float32), mask))
    assert np.flatnonzero(np.isfinite(out[0])).tolist() == allowed
    assert np.isfinite(out[1]).all()
    assert np.asarray(apply_grammar_mask(np.zeros((2, v), np.float32), np.zeros((2, 0), np.int32))).shape == (2, v)


def test_a_row_with_no_allowed_token_samples_no_token_never_token_0():
    v = 40
    mask = np.zeros((2, 2), np.int32)
    mask[:, 0] = 1 << 5  # only token 5
    reqs = [Request("a", [1], SamplingParams(min_tokens=3), max_tokens=8, eos_token_ids=(5,)),
            Request("b", [1], SamplingParams(), max_tokens=8, eos_token_ids=(5,))]
    extras = build_logits_extras(reqs, 2, with_extras=True, history_len=4)
    st = build_sampling_tensors([r.params for r in reqs], [0, 0], [0, 0], 2)
    tokens, _ = jax.jit(sample)(np.zeros((2, v), np.float32), st, extras, mask)
    assert np.asarray(tokens).tolist() == [NO_TOKEN, 5]


def test_compiled_grammars_are_cached_by_spec_and_give_independent_matchers(engine):
    spec = StructuredOutput("choice", json.dumps(["ab", "cd"]), param="guided_choice")
    same = StructuredOutput("choice", json.dumps(["ab", "cd"]), param="structured_outputs.choice")
    compiled = engine.grammars.compile(spec)
    assert engine.grammars.compile(same) is compiled  # the field that sent it is not part of the key
    a, b = compiled.matcher(), compiled.matcher()
    first = engine.tokenizer.encode("ab", add_special_tokens=False)
    assert all(a.consume(t) for t in first) and a.done and not b.done


# After "a" only "b" or "c" may follow, after "d" only "e" or "f": a mask computed before the matcher
# consumed the previous token allows the wrong half.
ALTERNATING = r"(a[bc]|d[ef]){6}"


def _stale_step(engine) -> list:
    """``LLMEngine.step`` with the bug the split exists to avoid: a grammar step samples before the
    previous step's tokens are applied (so before its matchers consume them)."""
    prev, engine._inflight = engine._inflight, None
    step = engine._dispatch(engine.scheduler.schedule(), prev)
    if step is not None and step.handle.pending is not None:
        step = dataclasses.replace(step, handle=engine.runner.sample(step.handle))
    outputs = engine._finish(prev) if prev is not None else []
    engine._inflight = step
    return outputs


def _alternating(engine) -> list[tuple[str, str]]:
    spec = StructuredOutput("regex", ALTERNATING)
    prompt = engine.tokenizer.encode("ad")
    return _run(engine, [(prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=i, structured=spec))
                         for i in range(4)])


def test_async_grammar_steps_sample_after_the_previous_token_is_consumed(engine, monkeypatch):
    calls = {"forward": 0, "sample": 0}
    for name in calls:
        def spy(*args, _name=name, _orig=getattr(engine.runner, f"_{name}")):
            calls[_name] += 1
            return _orig(*args)
        monkeypatch.setattr(engine.runner, f"_{name}", spy)
    for text, finish in _alternating(engine):
        assert finish == "stop" and re.fullmatch(ALTERNATING, text), (text, finish)
    assert calls["forward"] == calls["sample"] > 6  # the split path ran, one sample per forward
    # The twin: sampling before the matchers consumed the previous token is refused...
    monkeypatch.setattr(engine, "step", lambda: _stale_step(engine))
    with pytest.raises(RuntimeError, match="before its matcher consumed its previous token"):
        _alternating(engine)
    for rid in list(engine.requests):
        engine.abort(rid)
    engine._inflight = None
    # ... and without the guard, its masks are stale: replies leave the grammar.
    monkeypatch.setattr(type(engine.runner), "_check_consumed", staticmethod(lambda req: None))
    assert not all(f == "stop" and re.fullmatch(ALTERNATING, t) for t, f in _alternating(engine))


def test_steps_without_grammar_rows_run_only_the_fused_executables(engine, monkeypatch):
    ran: list[str] = []
    for name in ("_run", "_forward", "_sample"):
        def spy(*args, _name=name, _orig=getattr(engine.runner, name)):
            ran.append(_name)
            return _orig(*args)
        monkeypatch.setattr(engine.runner, name, spy)
    prompt = engine.tokenizer.encode("hello")
    _run(engine, [(prompt, SamplingParams(max_tokens=5, temperature=t, seed=1, logprobs=2)) for t in (0.0, 1.0)])
    assert ran and set(ran) == {"_run"}
    ran.clear()
    _run(engine, [(prompt, SamplingParams(max_tokens=5, structured=StructuredOutput("regex", "[ab]{8}")))])
    assert {"_forward", "_sample"} <= set(ran)  # the twin: a grammar request does reach the split path


def test_grammar_requests_stay_valid_through_preemption_stop_strings_and_logprobs(engine):
    preemptions = engine.scheduler.num_preemptions
    spec = StructuredOutput("regex", "[ab]{100}")
    prompt = engine.tokenizer.encode("Give me data:")
    long = [(prompt, SamplingParams(max_tokens=110, temperature=1.0, seed=i, structured=spec, logprobs=1))
            for i in range(4)]
    stopped = [(prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=9, stop=["ba"], structured=StructuredOutput(
        "regex", "[ab]{30}")))]
    results = _run(engine, long + stopped)
    assert engine.scheduler.num_preemptions > preemptions  # four ~110-token requests share 95 blocks of 4
    for text, finish in results[:4]:
        assert finish == "stop" and re.fullmatch("[ab]{100}", text), (text, finish)
    text, finish = results[4]
    assert finish == "stop" and re.fullmatch("[ab]{0,30}", text) and "ba" not in text, text


class _MaskFault:
    """A matcher whose mask row cannot be built (consumes like the one it wraps)."""

    def __init__(self, grammar) -> None:
        self._g = grammar
        self.consume = grammar.consume

    done = property(lambda self: self._g.done)
    error = property(lambda self: self._g.error)

    @property
    def ll(self):
        raise RuntimeError("injected mask fault")


def test_a_mask_fault_in_the_deferred_sample_fails_that_request_alone(engine):
    spec = StructuredOutput("regex", "[ab]{6}")
    prompt = engine.tokenizer.encode("ab")
    good = engine.add_request("mask-ok", prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=1, structured=spec))
    bad = engine.add_request("mask-bad", prompt, SamplingParams(max_tokens=10, structured=spec))
    bad.grammar = _MaskFault(bad.grammar)
    text, finish = {"mask-ok": "", "mask-bad": ""}, {}
    while len(finish) < 2:
        for out in engine.step():
            text[out.request_id] += out.new_text
            if out.finished:
                finish[out.request_id] = (out.finish_reason, getattr(out, "error", None))
    assert finish["mask-bad"][0] == "error" and "injected mask fault" in finish["mask-bad"][1]
    assert finish["mask-ok"][0] == "stop" and re.fullmatch("[ab]{6}", text["mask-ok"]), (text, finish)
    while engine.has_unfinished():  # the step in flight when both finished
        assert engine.step() == []
    assert good.status.finished
