"""Prefix caching: shared full blocks, exact keys, LRU eviction, identical outputs, fewer computed tokens."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine.block_manager import BlockManager
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.helpers import lookback_continue


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), max_tokens=4)


def _admit(bm: BlockManager, req: Request) -> list[int]:
    hits = bm.match_prefix(req)
    n = req.num_tokens - len(hits) * bm.block_size
    assert bm.can_admit(req, hits, n)
    bm.acquire_prefix(req, hits)
    bm.allocate(req, n)
    req.num_computed_tokens += n
    bm.register_full_blocks(req, req.num_tokens)
    return hits


def test_shared_prefix_blocks_are_reused_and_ref_counted():
    bm = BlockManager(20, 4, enable_prefix_caching=True)
    a = _req("a", list(range(10, 21)))  # 11 tokens: 2 full blocks + 3
    assert _admit(bm, a) == []
    b = _req("b", list(range(10, 18)) + [99, 98, 97])  # same first 8 tokens
    hits = _admit(bm, b)
    assert hits == a.block_ids[:2] and b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert [bm.blocks[x].ref_count for x in hits] == [2, 2]
    assert (bm.prefix_queries, bm.prefix_hits) == (22, 8)
    bm.free(a)
    assert [bm.blocks[x].ref_count for x in hits] == [1, 1]
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2  # the shared full blocks stay findable


def test_keys_are_exact_prefixes_not_block_contents():
    bm = BlockManager(20, 4, enable_prefix_caching=True)
    _admit(bm, _req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block contents, different first block: no hit at all.
    assert bm.match_prefix(_req("b", [0, 0, 0, 0, 5, 6, 7, 8, 9])) == []
    # The whole prompt cached: the last block is recomputed so at least one token runs.
    assert len(bm.match_prefix(_req("c", [1, 2, 3, 4, 5, 6, 7, 8]))) == 1


def test_free_cached_blocks_are_evicted_lru_and_counted_as_free():
    bm = BlockManager(5, 2, enable_prefix_caching=True)  # 4 usable
    a = _req("a", [1, 2, 3, 4, 5])
    _admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    b = _req("b", [7, 8, 9, 10, 11, 12, 13])  # needs all 4 blocks: evicts a's cached ones
    _admit(bm, b)
    assert bm.num_cached_blocks == 3 and bm.match_prefix(_req("c", [1, 2, 3, 4, 5])) == []


def test_disabled_cache_never_matches():
    bm = BlockManager(20, 4)
    a = _req("a", list(range(9)))
    _admit(bm, a)
    assert bm.match_prefix(_req("b", list(range(9)))) == [] and bm.num_cached_blocks == 0


@pytest.mark.hf_reference
def test_outputs_identical_with_and_without_caching(hf_checkpoints):
    directory, _ = hf_checkpoints("llama")
    rng = np.random.RandomState(11)
    system = rng.randint(3, 300, size=37).tolist()
    prompts = [system + rng.randint(3, 300, size=n).tolist() for n in (3, 9, 17, 1)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for caching in (False, True):
        eng = make_engine(directory, enable_prefix_caching=caching, max_model_len=128)
        first = eng.generate(prompts[:1], params)
        rest = eng.generate(prompts[1:], params)
        results[caching] = first + rest
        hits = eng.scheduler.block_manager.prefix_hits
        assert (hits > 0) == caching
    assert results[True] == results[False]


def test_second_request_computes_only_its_new_tokens(lookback_model):
    eng = make_engine(lookback_model, enable_prefix_caching=True, block_size=4)
    system = list(range(100, 140))  # 40 tokens = 10 full blocks
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    before = eng.counters.prompt_tokens
    eng.generate([system + [7, 8, 9]], params)
    first = eng.counters.prompt_tokens - before
    prompt = system + [50, 51, 52, 53, 54]
    out = eng.generate([prompt], params)
    second = eng.counters.prompt_tokens - before - first
    assert first == 43 and second == 5
    assert out == [lookback_continue(prompt, 3)]
    # One new token: the only computed position reads the previous one from a reused block.
    for last in (7, 200):
        assert eng.generate([system + [last]], params) == [lookback_continue(system + [last], 3)]
    assert eng.counters.prompt_tokens - before - first - second == 2
