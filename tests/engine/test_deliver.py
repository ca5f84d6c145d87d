"""The engine thread hands a step's outputs to the event loop in one wake-up per loop, in order."""

from __future__ import annotations

import asyncio
import threading

from jaxserve.engine.async_engine import AsyncEngine, Outbox


def _engine_with_streams(loops: list[asyncio.AbstractEventLoop], per_loop: int) -> tuple[AsyncEngine, dict]:
    """An unstarted engine with ``per_loop`` one-choice submissions registered on each loop."""
    engine = AsyncEngine(lambda: None)  # never started: only the delivery path runs
    boxes = {}
    for li, loop in enumerate(loops):
        for k in range(per_loop):
            rid = f"r{li}{k}"
            boxes[rid] = Outbox(engine, [rid], {0}, None)
            engine._streams[rid] = (loop, boxes[rid], 0)
    return engine, boxes


def _count_wakeups(loop: asyncio.AbstractEventLoop) -> list[int]:
    calls = [0]
    orig = loop.call_soon_threadsafe

    def counting(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    loop.call_soon_threadsafe = counting
    return calls


def _deliver_from_another_thread(engine: AsyncEngine, items: list) -> None:
    t = threading.Thread(target=engine._deliver_all, args=(items,))
    t.start()
    t.join()


def test_one_wakeup_per_loop_and_step_in_order():
    loop = asyncio.new_event_loop()
    try:
        calls = _count_wakeups(loop)
        engine, boxes = _engine_with_streams([loop], 3)
        # two steps' outputs for three requests, plus one for a request with no stream (dropped)
        items = [(rid, f"{rid}:{step}") for step in range(2) for rid in boxes] + [("gone", "x")]
        _deliver_from_another_thread(engine, items[:3] + items[-1:])
        _deliver_from_another_thread(engine, items[3:6])
        loop.run_until_complete(asyncio.sleep(0))
        assert calls[0] == 2  # one per step, not one per output (6)
        for rid, box in boxes.items():
            got = [box.queue.get_nowait() for _ in range(box.queue.qsize())]
            assert got == [(0, f"{rid}:0"), (0, f"{rid}:1")]
    finally:
        loop.close()


def test_two_loops_are_woken_once_each():
    """The twin: outputs for submissions on two loops need two wake-ups, each with its own items."""
    loops = [asyncio.new_event_loop(), asyncio.new_event_loop()]
    try:
        counts = [_count_wakeups(loop) for loop in loops]
        engine, boxes = _engine_with_streams(loops, 2)
        _deliver_from_another_thread(engine, [(rid, rid) for rid in boxes])
        for loop in loops:
            loop.run_until_complete(asyncio.sleep(0))
        assert [c[0] for c in counts] == [1, 1]
        assert all(box.queue.get_nowait() == (0, rid) for rid, box in boxes.items())
    finally:
        for loop in loops:
            loop.close()
