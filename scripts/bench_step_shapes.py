"""Device time of each plain step shape (decode and mixed buckets), interleaved, on padding inputs.

Builds the engine of a config (every shape compiled, no background compile), then runs each plain
shape's executable on the runner's zero inputs (padding tokens: no KV read, so attention is
near-free and the figure is the step's fixed cost: projections, MLP, LM head over B rows), round
robin ``--reps`` times; prints min and median ms per shape. For the scheduler's arithmetic: what a
prefill step of T tokens costs against a decode step. ``--shapes`` times only the listed shapes
(``mixed:T/B`` or ``decode:B``, any row count, listed or not in the bucket policy: e.g. the same T
at several row counts), compiled after start-up.

    .venv/bin/python scripts/bench_step_shapes.py --config configs/smollm2.yaml --reps 7 \\
        --compilation-cache-dir /tmp/xlacache_sched
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

from jaxserve.config_loading import load_config
from jaxserve.engine.compilation import StepShape
from jaxserve.engine.llm_engine import LLMEngine


def parse_shape(spec: str) -> StepShape:
    """``mixed:T/B`` or ``decode:B``."""
    kind, _, size = spec.partition(":")
    if kind == "decode":
        return StepShape(int(size), int(size), True)
    t, b = size.split("/")
    return StepShape(int(t), int(b), False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--shapes", default=None, help="comma-separated mixed:T/B or decode:B (default: every plain shape)")
    args, rest = p.parse_known_args()
    only = [parse_shape(x) for x in args.shapes.split(",")] if args.shapes else None
    config = load_config([*rest, "--background-compile" if only else "--no-background-compile"])
    engine = LLMEngine(config, progress=False)
    runner = engine.runner
    if only:
        runner.stop_background()
        runner.compile_all(only)
        runner.warm_up()
    shapes = only or [s for s in runner.compiled_shapes if not (s.extras or s.grammar)]
    times: dict = {s: [] for s in shapes}
    for _ in range(args.reps):
        for s in shapes:
            inputs = runner._zero_inputs(s)[0]
            t = time.perf_counter()
            tokens, _ = runner._run(s, inputs)
            jax.block_until_ready(tokens)
            times[s].append((time.perf_counter() - t) * 1e3)
    print("| shape | T | B | min ms | median ms |")
    print("|---|---|---|---|---|")
    for s in shapes:
        kind = "decode" if s.decode_only else "mixed"
        print(f"| {kind} | {s.num_tokens} | {s.num_seqs} | {min(times[s]):.1f} | {statistics.median(times[s]):.1f} |")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
