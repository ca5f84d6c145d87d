"""Scheduler: token budget, max_num_seqs, chunked prefill next to decodes, preemption and recompute."""

from __future__ import annotations

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.step_results import decide_finish
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams


def _req(rid: str, n: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(5, 5 + n)), SamplingParams(temperature=0), max_tokens=max_tokens)


def _advance(s: Scheduler, out, token: int = 7) -> None:
    """What the engine does with a step (without text): launch it, resolve its tokens, finish requests."""
    slots = s.launch(out)
    for item, slot in zip(out.scheduled, slots, strict=True):
        s.resolve(item.request, slot, token)
        finish = decide_finish(item.request, slot + 1, token, None) if slot >= 0 else None
        if finish is not None:
            s.finish(item.request, finish.status)


def test_chunked_prefill_runs_beside_decodes():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=10)
    a = _req("a", 3)
    s.add(a)
    _advance(s, s.schedule())  # a prefilled, has 1 output
    b = _req("b", 25)
    s.add(b)
    out = s.schedule()
    assert [(x.request.request_id, x.start, x.num_tokens) for x in out.scheduled] == [("a", 3, 1), ("b", 0, 9)]
    assert not out.scheduled[1].samples  # a partial prefill chunk is not sampled
    _advance(s, out)
    out = s.schedule()
    assert [(x.request.request_id, x.start, x.num_tokens) for x in out.scheduled] == [("a", 4, 1), ("b", 9, 9)]
    _advance(s, out)
    out = s.schedule()
    assert [(x.request.request_id, x.start, x.num_tokens) for x in out.scheduled] == [("a", 5, 1), ("b", 18, 7)]
    assert out.scheduled[1].samples


def test_max_num_seqs_limits_admission():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        s.add(_req(f"r{i}", 2))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_preemption_frees_and_recomputes():
    # 4 usable blocks of 2 tokens: two 4-token prompts fill them; the first decode needs a fifth.
    bm = BlockManager(5, 2)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    a, b = _req("a", 4, max_tokens=4), _req("b", 4, max_tokens=4)
    s.add(a)
    s.add(b)
    _advance(s, s.schedule())  # both prefilled: 2 blocks each
    assert bm.num_free_blocks == 0
    out = s.schedule()  # a needs a third block: b (newest) is preempted
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    assert out.preempted == [b] and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.status is RequestStatus.WAITING and s.num_preemptions == 1
    _advance(s, out)
    while s.num_unfinished:
        out = s.schedule()
        _advance(s, out)
        if any(x.request is b and x.start == 0 for x in out.scheduled):
            recomputed = next(x for x in out.scheduled if x.request is b)
            assert recomputed.num_tokens == b.num_prompt_tokens + 1  # prompt + the token it already had
    assert a.num_output_tokens == 4 and b.num_output_tokens == 4
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_every_block_free_after_mixed_workload():
    bm = BlockManager(12, 4)
    s = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=8)
    reqs = [_req(f"r{i}", n, max_tokens=m) for i, (n, m) in enumerate([(9, 5), (2, 7), (14, 3), (5, 6), (1, 9)])]
    for r in reqs:
        s.add(r)
    steps = 0
    while s.num_unfinished:
        out = s.schedule()
        assert out.num_tokens <= 8 and len(out.scheduled) <= 3
        _advance(s, out)
        steps += 1
        assert steps < 200
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert [r.num_output_tokens for r in reqs] == [5, 7, 3, 6, 9]
    assert bm.num_free_blocks == bm.num_usable_blocks
