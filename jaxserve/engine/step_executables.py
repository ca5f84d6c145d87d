"""The runner's compiled step executables: compiled at start-up or in the background, warmed up,
and the shape a step may run in while the others compile.

``StepExecutables`` is the part of ``engine/model_runner.ModelRunner`` that owns its executables (a
base class: the runner supplies ``programs(shape)``, the jitted functions and abstract arguments of
a shape; ``_run_parts``, running one on host inputs; ``_zero_inputs``; its KV caches and previous
tokens). ``engine/background_compile.BackgroundCompiler`` is the thread that compiles in the
background. Also here: this process's XLA compile and persistent-cache-hit counters (jax's
monitoring events), which ``compiles_while_serving`` reads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable

import jax
from tqdm import tqdm

from jaxserve.engine.background_compile import BackgroundCompiler
from jaxserve.engine.compilation import BucketPolicy, StepShape
from jaxserve.engine.multihost import StepChannel
from jaxserve.engine.step_functions import program_key

logger = logging.getLogger(__name__)

CPU_WARM_UP_MAX_TOKENS = 512  # larger steps are not warmed up on CPU (see StepExecutables.warm_up)


class _CacheHits:
    """Persistent-compilation-cache hits in this process (jax reports them as events, from any thread)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def __call__(self, event: str, **_: object) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            with self._lock:
                self.value += 1


_cache_hits = _CacheHits()
jax.monitoring.register_event_listener(_cache_hits)


class _Compiles:
    """XLA compiles in this process per calling thread (jax times each one as an event, on the
    thread that compiles): the engine counts those on its own thread once it serves."""

    def __init__(self) -> None:
        self._by_thread: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            with self._lock:
                self._by_thread[threading.get_ident()] += 1

    def on_thread(self, ident: int) -> int:
        with self._lock:
            return self._by_thread[ident]


compiles = _Compiles()
jax.monitoring.register_event_duration_secs_listener(compiles)


class StepExecutables:
    """Compiled executables per step shape, which of them ran once (warm), and the background compiler."""

    buckets: BucketPolicy
    channel: StepChannel
    kv_caches: list
    _prev_tokens: jax.Array

    def _init_executables(self) -> None:
        # One executable per shape, two (forward, sample) for grammar shapes, which share them.
        self._compiled: dict[StepShape, tuple[jax.stages.Compiled, ...]] = {}
        self._executables: dict[tuple, jax.stages.Compiled] = {}
        self._warm: set[StepShape] = set()  # compiled shapes that ran once (warm_up, warm_next)
        self.background: BackgroundCompiler | None = None
        self.compile_cache_hits = 0

    def programs(self, shape: StepShape) -> list[tuple[Callable, tuple]]:
        """The jitted functions of a step of ``shape`` with their abstract arguments (the runner's)."""
        raise NotImplementedError

    def _run_parts(self, shape: StepShape, parts: list[tuple]) -> None:
        """Run a step of ``shape`` from its host inputs (the runner's)."""
        raise NotImplementedError

    def _zero_inputs(self, shape: StepShape) -> list[tuple]:
        """Padding host inputs of ``shape`` (the runner's)."""
        raise NotImplementedError

    def compile_all(self, shapes: list[StepShape] | None = None, *, progress: bool = False) -> float:
        """Compile every bucket (or ``shapes``); returns the seconds it took.

        Executables that several shapes share (a grammar shape's forward or sampling) compile once.
        Tracing and lowering hold the GIL and run one at a time; on an accelerator host every
        executable is lowered first and XLA's compiles then run in a thread pool (they release the GIL),
        one per core. On CPU each shape is lowered and compiled in turn, in this thread: a pool gave
        no gain on a 2-core server (docs/benchmarks.md). (The XLA:CPU segfaults once blamed on
        pool compiles were the test session running out of memory mappings: every live executable
        holds hundreds; tests/engine/engine_helpers.py.)
        ``compile_cache_hits`` then says how many came from the persistent compilation cache.
        """
        t0 = time.perf_counter()
        hits0 = _cache_hits.value
        todo = [s for s in (shapes or self.buckets.all_shapes()) if s not in self._compiled]
        # Accelerator hosts have cores to spare; a 2-core CPU server or a multi-process launch does not.
        parallel = jax.default_backend() != "cpu" and jax.process_count() == 1
        self._compile(todo, parallel=parallel, progress=progress)
        logger.debug("compiled %d shapes in %.2fs", len(todo), time.perf_counter() - t0)
        self.channel = StepChannel(self.compiled_shapes, self._zero_inputs)
        self.compile_cache_hits = _cache_hits.value - hits0
        return time.perf_counter() - t0

    def _compile(self, todo: list[StepShape], *, parallel: bool = False, progress: bool = False) -> None:
        """Compile the executables of ``todo`` not compiled yet, then register the shapes."""
        keyed = {shape: [(program_key(fn, args), fn, args) for fn, args in self.programs(shape)] for shape in todo}
        new = {key: (fn, args) for parts in keyed.values() for key, fn, args in parts if key not in self._executables}
        workers = max(1, min(len(new), os.cpu_count() or 1)) if parallel else 1
        with tqdm(total=len(new), desc="Compiling step executables", unit="exe", disable=not progress) as bar:
            if workers == 1:
                for key, (fn, args) in new.items():
                    t0, hits0 = time.perf_counter(), _cache_hits.value
                    self._executables[key] = fn.lower(*args).compile()
                    logger.debug("executable %s: %.2fs (%s)", key[0], time.perf_counter() - t0,
                                 "compilation cache" if _cache_hits.value > hits0 else "compiled")
                    bar.update()
            else:
                lowered = {key: fn.lower(*args) for key, (fn, args) in new.items()}
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    futures = {key: pool.submit(low.compile) for key, low in lowered.items()}
                    for future in futures.values():
                        future.add_done_callback(lambda _: bar.update())
                    self._executables.update({key: f.result() for key, f in futures.items()})
        for shape, parts in keyed.items():
            self._compiled[shape] = tuple(self._executables[key] for key, _, _ in parts)

    def compile_in_background(self) -> None:
        """Start compiling every shape not compiled yet (``BucketPolicy.background_order``) in a thread;
        until a shape is compiled and warmed up, ``dispatch`` runs its steps in a larger ready
        shape of its family, or waits for it (``engine/background_compile.py``)."""
        todo = [s for s in self.buckets.background_order() if s not in self._compiled]
        if todo:
            self.background = BackgroundCompiler(lambda shape: self._compile([shape]), todo)

    def _usable_shape(self, shape: StepShape) -> StepShape:
        """``shape``, or while background compiles run, a warmed-up shape that holds its step."""
        if shape in self._warm or self.background is None:
            return shape
        fallback = self.buckets.fallback(shape, self._warm)
        if fallback is not None:
            return fallback
        if shape not in self._compiled:
            self.background.wait_for(shape)
        return shape

    def warm_next(self) -> bool:
        """Run one compiled but not yet warmed-up shape once on padding inputs (the engine calls it
        when idle, so that requests do not pay its first run); False when there is none."""
        cold = [s for s in self.compiled_shapes if s not in self._warm]
        if not cold:
            return False
        self._warm_up_shapes(cold[:1])
        return True

    @property
    def compiles_pending(self) -> int:
        """Shapes the background compiler has still to compile (0 without one)."""
        return 0 if self.background is None else self.background.pending

    def stop_background(self) -> None:
        """Stop background compiles, waiting for the one under way: a daemon thread still inside
        XLA when the interpreter exits aborts the process ("FATAL: exception not rethrown")."""
        if self.background is not None:
            self.background.stop(timeout=None)

    def warm_up(self) -> float:
        """Run every compiled shape once on padding inputs; returns the seconds it took.

        A compiled executable's first run costs more than later ones (about 0.3 s per shape for
        SmolLM2 on XLA:CPU), which would otherwise land on the first request of each bucket. Padding
        tokens write only the null block and read no KV. On CPU, steps of more than
        ``CPU_WARM_UP_MAX_TOKENS`` tokens are skipped: their own compute (seconds) dwarfs that cost,
        and running them would add minutes to start-up with accelerator-sized buckets. Every
        process runs the same shapes in the same order, so multi-host collectives stay matched.
        """
        t0 = time.perf_counter()
        self._warm_up_shapes(self.compiled_shapes)
        return time.perf_counter() - t0

    def _warm_up_shapes(self, shapes: list[StepShape]) -> None:
        prev_tokens = self._prev_tokens  # not donated: serving starts from it as if nothing ran
        cpu = jax.devices()[0].platform == "cpu"
        for shape in shapes:
            if not (cpu and shape.num_tokens > CPU_WARM_UP_MAX_TOKENS):
                self._run_parts(shape, self._zero_inputs(shape))
            self._warm.add(shape)
        jax.block_until_ready(self.kv_caches)
        self._prev_tokens = prev_tokens

    @property
    def compiled_shapes(self) -> list[StepShape]:
        return sorted(self._compiled)

    @property
    def num_executables(self) -> int:
        """Distinct compiled executables (grammar shapes share their forwards and samplings)."""
        return len(self._executables)
