"""The engine on a model whose outputs are known by hand and depend on the KV cache.

Next token = the first token after the last one whose residue mod 16 is the *previous* token's + 1
(``tests.helpers.lookback_next``): every decode step reads the token before it back from the
cache, so a wrong slot, block table, position or recomputation changes the output. Token 2 is
the tokenizer's EOS (<|im_end|>).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.helpers import lookback_continue

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
EOS = 2


def _prompts() -> list[list[int]]:
    rng = np.random.RandomState(3)
    return [[10, 20, 30], [100], list(range(40, 90)), [7] * 33, rng.randint(3, 300, size=70).tolist()]


def test_outputs_follow_the_cached_previous_token(lookback_model):
    eng = make_engine(lookback_model)
    outs = eng.generate(_prompts(), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert outs == [lookback_continue(p, 20) for p in _prompts()]
    assert eng.scheduler.block_manager.num_used_blocks == 0


def test_bfloat16_weights_with_float32_activations(lookback_model):
    eng = make_engine(lookback_model, dtype="bfloat16")
    assert jnp.dtype(eng.runner.loaded.dtype) == jnp.bfloat16
    assert eng.runner.kv_caches[0][0].dtype == jnp.uint16  # the cpu backend's pages: bf16 bits
    assert eng.generate(_prompts(), GREEDY) == [lookback_continue(p, 6) for p in _prompts()]


def test_chunked_prefill_reads_the_earlier_chunks(lookback_model):
    # A 32-token budget splits these prompts into 2-4 chunks; the last chunk's first token reads
    # the previous chunk's last token from the cache.
    eng = make_engine(lookback_model)
    prompts = [list(range(5, 5 + n)) for n in (33, 64, 97)] + [[9] * 31 + [200]]
    outs = eng.generate(prompts, GREEDY)
    assert outs == [lookback_continue(p, 6) for p in prompts]


def test_packed_fresh_prompts_then_prefix_hits(lookback_model):
    # Step 1 packs four fresh prompts (31 of 32 tokens, so a padding token too); step 2 a prompt
    # whose first 20 tokens (five blocks) hit the prefix cache beside a fresh one. [100] follows
    # [.., 30] in the packed tokens: were sequences to see each other, it would read 30 as its
    # previous token, and the expected tokens differ.
    assert lookback_continue([100], 6) != lookback_continue([30, 100], 6)
    eng = make_engine(lookback_model)
    fresh = [[10, 20, 30], [100], [7, 8, 9, 250, 251, 13, 14], list(range(130, 150))]
    assert eng.generate(fresh, GREEDY) == [lookback_continue(p, 6) for p in fresh]
    hits0 = eng.scheduler.block_manager.prefix_hits
    second = [list(range(130, 150)) + [5, 6], [3, 4, 5]]
    assert eng.generate(second, GREEDY) == [lookback_continue(p, 6) for p in second]
    assert eng.scheduler.block_manager.prefix_hits > hits0


def test_eos_stop_tokens_and_ignore_eos(lookback_model):
    eng = make_engine(lookback_model)
    # After 310 the first token with residue (1 + 1) mod 16 is 322 mod 320 = 2, the EOS.
    assert eng.generate([[1, 310]], SamplingParams(temperature=0, max_tokens=20)) == [[EOS]]
    want = lookback_continue([1, 310], 8)
    assert want[0] == EOS
    assert eng.generate([[1, 310]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) == [want]
    stop_at = lookback_continue([50, 51], 5)[2]
    got = eng.generate([[50, 51]], SamplingParams(temperature=0, max_tokens=9, stop_token_ids=(stop_at,)))
    assert got == [lookback_continue([50, 51], 3)]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_requests_join_and_leave_every_step(lookback_model, async_scheduling):
    eng = make_engine(lookback_model, async_scheduling=async_scheduling)
    got: dict[str, list[int]] = {}
    arrivals = {0: ("a", [5], 4), 1: ("b", list(range(60, 100)), 3), 2: ("c", [9, 9], 7), 5: ("d", [200], 2),
                6: ("e", list(range(3, 40)), 9)}
    step = 0
    while step < 80 and (step <= max(arrivals) or eng.has_unfinished()):
        if step in arrivals:
            rid, prompt, n = arrivals[step]
            eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            got[rid] = []
        for out in eng.step():
            got[out.request_id].extend(out.new_token_ids)
        step += 1
    assert got == {rid: lookback_continue(p, n) for rid, p, n in arrivals.values()}
    assert eng.scheduler.block_manager.num_used_blocks == 0


def test_preemption_under_a_tiny_cache_keeps_outputs_exact(lookback_model):
    # 10 usable blocks of 4 tokens; four requests of up to 24 positions cannot all fit at once.
    eng = make_engine(lookback_model, num_kv_blocks=11, max_model_len=40)
    prompts = [list(range(1 + 3 * i, 13 + 3 * i)) for i in range(4)]
    before = eng.scheduler.num_preemptions
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert outs == [lookback_continue(p, 12) for p in prompts]
    assert eng.scheduler.num_preemptions > before
    assert eng.scheduler.block_manager.num_used_blocks == 0


def _run_with_logprobs(eng, prompts, params) -> list[tuple[list[int], list]]:
    ids = [f"lp-{i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, params, strict=True):
        eng.add_request(rid, p, sp)
    got: dict[str, tuple[list[int], list]] = {rid: ([], []) for rid in ids}
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].extend(out.logprobs or [])
    return [got[rid] for rid in ids]


@pytest.mark.parametrize("kind", ["seeded", "penalties"])
def test_preemption_keeps_seeded_samples_penalties_and_logprobs(lookback_model, kind):
    # A high temperature makes the draws matter; the reference is the same batch in a cache big
    # enough that nothing is preempted.
    prompts = [list(range(1 + 3 * i, 13 + 3 * i)) for i in range(4)]
    extra = dict(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3) if kind == "penalties" else {}
    params = [SamplingParams(temperature=1.8, seed=100 + i, max_tokens=12, ignore_eos=True, logprobs=2, **extra)
              for i in range(4)]
    big = make_engine(lookback_model, max_model_len=40)
    want = _run_with_logprobs(big, prompts, params)
    assert big.scheduler.num_preemptions == 0
    small = make_engine(lookback_model, num_kv_blocks=11, max_model_len=40)
    before = small.scheduler.num_preemptions
    got = _run_with_logprobs(small, prompts, params)
    assert small.scheduler.num_preemptions > before
    assert [g[0] for g in got] == [w[0] for w in want]
    assert any(g[0] != lookback_continue(p, 12) for g, p in zip(got, prompts, strict=True))  # it did sample
    for (_, lp_got), (_, lp_want) in zip(got, want, strict=True):
        assert [x.token_id for x in lp_got] == [x.token_id for x in lp_want]
        np.testing.assert_allclose([x.logprob for x in lp_got], [x.logprob for x in lp_want], atol=1e-5)


def test_abort_frees_blocks_at_once(lookback_model):
    eng = make_engine(lookback_model)
    eng.add_request("x", list(range(3, 40)), SamplingParams(temperature=0, max_tokens=50))
    eng.step()
    eng.step()
    assert eng.scheduler.block_manager.num_used_blocks > 0
    assert eng.abort("x")
    assert eng.scheduler.block_manager.num_used_blocks == 0
    assert eng.step() == []  # the step still in flight finishes; its token is dropped
    assert not eng.has_unfinished()
    assert not eng.abort("x")


def test_stop_strings_cut_the_text(lookback_model):
    eng = make_engine(lookback_model)
    tok = eng.tokenizer
    prompt = [tok.convert_tokens_to_ids("a")]
    full = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert full == lookback_continue(prompt, 8)
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


def test_four_times_the_cache_completes_through_preemption_as_if_alone(lookback_model):
    # 10 usable blocks of 4 tokens (40 positions); 4 running requests of 40 positions each need 4x that.
    eng = make_engine(lookback_model, num_kv_blocks=11, max_model_len=40)
    assert eng.scheduler.block_manager.num_usable_blocks * 4 == 40
    prompts = [list(range(1 + 5 * i, 13 + 5 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    before = eng.scheduler.num_preemptions
    alone = [eng.generate([p], params)[0] for p in prompts]
    assert eng.scheduler.num_preemptions == before  # one at a time fits
    together = eng.generate(prompts, params)
    assert eng.scheduler.num_preemptions > before
    assert together == alone == [lookback_continue(p, 28) for p in prompts]
    assert eng.scheduler.block_manager.num_used_blocks == 0
