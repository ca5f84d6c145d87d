"""The engine on a model whose outputs are known by hand: next token = (token + 1) % 320.

Token 2 is the tokenizer's EOS (<|im_end|>), so a count that wraps past 319 stops at 2.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.helpers import TINY_VOCAB

GREEDY = SamplingParams(temperature=0, max_tokens=6)


def _count(last: int, n: int) -> list[int]:
    return [(last + 1 + i) % TINY_VOCAB for i in range(n)]


def test_outputs_count_up_from_last_prompt_token(counting_model):
    eng = make_engine(counting_model)
    prompts = [[10, 20, 30], [100], list(range(40, 90)), [7] * 33]
    outs = eng.generate(prompts, GREEDY)
    assert outs == [_count(30, 6), _count(100, 6), _count(89, 6), _count(7, 6)]
    assert eng.scheduler.block_manager.num_used_blocks == 0


def test_bfloat16_weights_with_float32_activations(counting_model):
    eng = make_engine(counting_model, dtype="bfloat16")
    assert jnp.dtype(eng.runner.loaded.dtype) == jnp.bfloat16 and eng.runner.kv_caches[0][0].dtype == jnp.float32
    prompts = [[10, 20, 30], [100], list(range(40, 90))]
    assert eng.generate(prompts, GREEDY) == [_count(30, 6), _count(100, 6), _count(89, 6)]


def test_eos_stop_tokens_and_ignore_eos(counting_model):
    eng = make_engine(counting_model)
    # 317 -> 318, 319, 0, 1, 2 (EOS): stops after emitting EOS.
    assert eng.generate([[317]], SamplingParams(temperature=0, max_tokens=20)) == [[318, 319, 0, 1, 2]]
    assert eng.generate([[317]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=(5,))) == [
        [318, 319, 0, 1, 2, 3, 4, 5]
    ]
    assert eng.generate([[50]], SamplingParams(temperature=0, max_tokens=3, stop_token_ids=(52,))) == [[51, 52]]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_requests_join_and_leave_every_step(counting_model, async_scheduling):
    eng = make_engine(counting_model, async_scheduling=async_scheduling)
    got: dict[str, list[int]] = {}
    arrivals = {0: ("a", [5], 4), 1: ("b", list(range(60, 100)), 3), 2: ("c", [9, 9], 7), 5: ("d", [200], 2)}
    step = 0
    while step < 60 and (step <= max(arrivals) or eng.has_unfinished()):
        if step in arrivals:
            rid, prompt, n = arrivals[step]
            eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=n))
            got[rid] = []
        for out in eng.step():
            got[out.request_id].extend(out.new_token_ids)
        step += 1
    assert got == {"a": _count(5, 4), "b": _count(99, 3), "c": _count(9, 7), "d": _count(200, 2)}
    assert eng.scheduler.block_manager.num_used_blocks == 0


def test_preemption_under_a_tiny_cache_keeps_outputs_exact(counting_model):
    # 10 usable blocks of 4 tokens; four requests of up to 24 positions cannot all fit at once.
    eng = make_engine(counting_model, num_kv_blocks=11, max_model_len=40)
    prompts = [list(range(1 + i, 13 + i)) for i in range(4)]
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert outs == [_count(p[-1], 12) for p in prompts]
    assert eng.scheduler.num_preemptions > 0
    assert eng.scheduler.block_manager.num_used_blocks == 0


def test_abort_frees_blocks_at_once(counting_model):
    eng = make_engine(counting_model)
    eng.add_request("x", list(range(3, 40)), SamplingParams(temperature=0, max_tokens=50))
    eng.step()
    eng.step()
    assert eng.scheduler.block_manager.num_used_blocks > 0
    assert eng.abort("x")
    assert eng.scheduler.block_manager.num_used_blocks == 0
    assert eng.step() == []  # the step still in flight finishes; its token is dropped
    assert not eng.has_unfinished()
    assert not eng.abort("x")


def test_stop_strings_cut_the_text(counting_model):
    eng = make_engine(counting_model)
    tok = eng.tokenizer
    prompt = [tok.convert_tokens_to_ids("a")]
    full = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    text = tok.decode(full)
    stop = text[3:5]
    eng.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=(stop,)))
    emitted, reason = "", None
    while eng.has_unfinished():
        for out in eng.step():
            emitted += out.new_text
            if out.finished:
                reason = (out.finish_reason, out.stop_reason)
    assert emitted == text[: text.index(stop)]
    assert reason == ("stop", stop)
