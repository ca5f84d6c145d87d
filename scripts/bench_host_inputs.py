"""``ModelRunner._host_inputs`` alone, without a device: µs per call (this thread's CPU time, median
of 7 × 500 calls) for a 16-row decode batch (every last token in flight) and a mixed batch (12
decodes + two fresh 38-token prompts in the 128/32 bucket). For before/after comparisons of the
host path: run it with each checkout's venv, alternating.

    .venv/bin/python scripts/bench_host_inputs.py
"""

from __future__ import annotations

import json
import time

import numpy as np

from jaxserve.engine.compilation import StepShape
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.engine.scheduler import ScheduledRequest
from jaxserve.request import PLACEHOLDER, Request
from jaxserve.sampling_params import SamplingParams


def req(i: int, plen: int, nout: int, pending: bool) -> Request:
    """A request with ``plen`` prompt and ``nout`` output tokens (one more in flight if ``pending``)."""
    params = SamplingParams(temperature=0, max_tokens=64)
    r = Request(f"r{i}", list(range(100 + i, 100 + i + plen)), params, max_tokens=64)
    r.output_token_ids = list(range(5, 5 + nout)) + ([PLACEHOLDER] if pending else [])
    r.block_ids = list(range(1 + 10 * i, 1 + 10 * i + -(-r.num_tokens // 16)))
    return r


def main() -> None:
    runner = object.__new__(ModelRunner)  # only the attributes _host_inputs reads
    runner.block_size, runner.table_width, runner.max_model_len, runner.lora = 16, 128, 2048, None
    decode = [ScheduledRequest(r, r.num_tokens - 1, 1) for r in (req(i, 40, 10, True) for i in range(16))]
    prompts = [req(20 + i, 38, 0, False) for i in range(2)]
    mix = decode[:12] + [ScheduledRequest(r, 0, r.num_tokens) for r in prompts]
    prev = {s.request.request_id: b for b, s in enumerate(decode)}
    out = {}
    cases = [("decode16", decode, StepShape(16, 16, True)), ("mix12+2x38", mix, StepShape(128, 32, False))]
    for name, sched, shape in cases:
        seeds = [0] * len(sched)
        for _ in range(200):
            runner._host_inputs(shape, sched, seeds, prev)
        best = []
        for _ in range(7):
            t = time.thread_time()
            for _ in range(500):
                runner._host_inputs(shape, sched, seeds, prev)
            best.append((time.thread_time() - t) / 500 * 1e6)
        out[name] = round(float(np.median(best)), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
