"""The engine: ``add_request`` / ``step`` / ``abort`` over scheduler + runner.

Start-up: resolve the checkpoint, read its config, load tokenizer and weights (sharded by the
tensor-parallel plan), size the KV cache, compile every step shape. Each ``step()`` schedules and
dispatches one device step, then finishes the previous one (async scheduling): its sampled tokens
go to ``step_results.StepResults``, which applies them to the requests and returns their text
deltas. Not thread-safe: the async wrapper drives it from a single thread.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import threading
import time
from pathlib import Path
from types import MappingProxyType

import jax

from jaxserve.config import ServeConfig
from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.compilation import BucketPolicy, mixed_row_floor
from jaxserve.engine.grammar import GrammarCompiler
from jaxserve.engine.interface import AdmittedRequest, EngineInfo, EngineMetrics, admit
from jaxserve.engine.kv_cache_size import device_bytes_in_use, num_kv_blocks
from jaxserve.engine.lora_slots import LoraNotFoundError, LoraRef, LoraSlots
from jaxserve.engine.model_runner import ModelRunner, StepHandle
from jaxserve.engine.step_executables import compiles
from jaxserve.engine.output_processor import OutputProcessor, RequestOutput
from jaxserve.engine.request_stats import RequestStats
from jaxserve.engine.scheduler import Scheduler, SchedulerOutput
from jaxserve.engine.step_results import EngineCounters, LaunchedStep, SampledTokens, StepResults
from jaxserve.models import ModelConfig
from jaxserve.models.attention_backends import resolve_backend
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.sharding import make_plan, sharded_config
from jaxserve.tokenizer import Tokenizer, eos_token_ids, load_tokenizer
from jaxserve.weights.loader import LoadedModel, load_model, read_model_config, resolve_dtype
from jaxserve.weights.source import ModelSource, resolve_model_source

logger = logging.getLogger(__name__)


class LoraInUseError(RuntimeError):
    """An adapter cannot be unloaded while requests use it (HTTP 409)."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    load_seconds: float
    compile_seconds: float
    warmup_seconds: float
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    num_compiled_shapes: int
    num_executables: int  # grammar shapes are two executables each, shared between shapes
    platform: str
    dtype: str


@dataclasses.dataclass(frozen=True)
class InflightStep:
    """A dispatched step whose sampled tokens have not reached the host yet (passed as a value)."""

    launched: LaunchedStep
    handle: StepHandle


def min_decode_batch(dtype: jax.numpy.dtype, platform: str) -> int:
    """XLA:CPU's one-row bf16 product is a slow path; a padding row makes it a fast bf16 GEMM."""
    return 2 if platform == "cpu" and jax.numpy.dtype(dtype) != jax.numpy.float32 else 1


class LLMEngine:
    """Continuous-batching generation over a paged KV cache."""

    def __init__(self, config: ServeConfig, *, progress: bool = True) -> None:
        t0 = time.perf_counter()
        self.config = config
        source = resolve_model_source(config.model)
        model_config, stored_dtype = read_model_config(source)
        self.model_config = model_config
        platform = jax.default_backend()
        dtype = resolve_dtype(config.dtype, stored_dtype, platform)
        self.max_model_len = self._resolve_max_model_len(config, model_config)
        self._load_tokenizer(source, model_config, t0)
        backend = resolve_backend(config.attention_backend, platform)
        logger.info("start-up 2/4: reading weights (%s)", source.path)
        in_use_before = device_bytes_in_use(platform)  # other models' (several in one process)
        loaded = self._load_weights(source, dtype, platform, backend, progress)
        self.loras = self._build_loras(loaded) if config.enable_lora else None  # before sizing the KV cache
        blocks = num_kv_blocks(config, loaded, self.max_model_len, platform, in_use_before=in_use_before,
                               backend=backend)
        self.runner = self._build_runner(loaded, blocks, dtype, platform, backend)
        load_s = time.perf_counter() - t0
        logger.info(
            "loaded %s (%s, %s, %d layers) in %.1fs; KV cache: %d blocks x %d tokens",
            config.model, model_config.architecture, jax.numpy.dtype(dtype).name,
            model_config.num_layers, load_s, blocks, config.block_size,
        )
        compile_s, warmup_s = self._compile_and_warm_up(progress)
        logger.info(
            "engine ready after %.1fs (load %.1fs, compile %.1fs, warm-up %.1fs)",
            time.perf_counter() - t0, load_s, compile_s, warmup_s,
        )
        self.scheduler = Scheduler(
            BlockManager(blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_loras=config.max_loras if config.enable_lora else 0,
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self.counters = EngineCounters()
        self.request_stats = RequestStats(self.max_model_len)
        self.results = StepResults(self.scheduler, self.outputs, self.counters, self.request_stats)
        self._thread = threading.get_ident()  # built on the thread that steps it (AsyncEngine's, or the caller's)
        self._compiles_at_ready = compiles.on_thread(self._thread)
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self.async_scheduling = config.async_scheduling
        self._inflight: InflightStep | None = None
        self._failed: list[RequestOutput] = []  # requests whose step inputs could not be built (see _dispatch)
        self.stats = EngineStats(
            load_seconds=load_s, compile_seconds=compile_s, warmup_seconds=warmup_s, num_kv_blocks=blocks,
            block_size=config.block_size, max_model_len=self.max_model_len,
            num_compiled_shapes=len(self.runner.compiled_shapes), num_executables=self.runner.num_executables,
            platform=platform,
            dtype=jax.numpy.dtype(dtype).name,
        )

    def _load_tokenizer(self, source: ModelSource, model_config: ModelConfig, t0: float) -> None:
        """Start-up 1/4: the tokenizer and what decoding takes from the checkpoint (EOS ids, sampling
        defaults from ``generation_config.json``, the grammar compiler)."""
        logger.info("start-up 1/4: building the tokenizer")
        self.tokenizer: Tokenizer = load_tokenizer(source, self.config.tokenizer)
        logger.info("tokenizer ready (%d tokens) after %.1fs", len(self.tokenizer), time.perf_counter() - t0)
        self.generation_config = _read_generation_config(source.directory if source.kind in ("hf", "orbax") else None)
        self.eos_token_ids = eos_token_ids(self.tokenizer, model_config.eos_token_ids, self.generation_config)
        # Like vLLM, the checkpoint's generation_config supplies defaults for unset sampling fields.
        self.default_sampling = {
            k: self.generation_config[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
            if self.generation_config.get(k) is not None
        }
        self.grammars = GrammarCompiler(self.tokenizer, model_config.vocab_size, self.eos_token_ids)

    def _compile_and_warm_up(self, progress: bool) -> tuple[float, float]:
        """Start-up phases 3 and 4 (with ``background_compile``, for the ready shapes only: the
        rest compile in a thread once the engine serves); returns their seconds."""
        runner = self.runner
        background = self.config.background_compile and runner.can_compile_in_background and jax.process_count() == 1
        shapes = runner.buckets.ready_shapes() if background else runner.buckets.all_shapes()
        logger.info("start-up 3/4: compiling %d step shapes%s", len(shapes),
                    f" (the other {len(runner.buckets.all_shapes()) - len(shapes)} after ready)" if background else "")
        compile_s = runner.compile_all(shapes, progress=progress)
        logger.info(
            "compiled %d step shapes (%d executables) in %.1fs (%d from the compilation cache)",
            len(self.runner.compiled_shapes), self.runner.num_executables, compile_s, self.runner.compile_cache_hits,
        )
        logger.info("start-up 4/4: warm-up (one run of each compiled step shape)")
        warmup_s = self.runner.warm_up()
        logger.info("warmed up in %.1fs", warmup_s)
        if background:
            runner.compile_in_background()
        return compile_s, warmup_s

    def _load_weights(
        self, source: ModelSource, dtype: jax.numpy.dtype, platform: str, backend: str, progress: bool
    ) -> LoadedModel:
        """The model's parameters, placed by the tensor-parallel plan."""
        config, model_config = self.config, self.model_config
        plan = make_plan(model_config, config.tensor_parallel_size)
        if plan.kv_replication > 1:
            logger.info(
                "tensor_parallel_size %d > num_key_value_heads %d: each KV head is replicated %d times at load",
                plan.tp, model_config.num_kv_heads, plan.kv_replication,
            )
        # CPUs keep float32 activations even with 16-bit weights (XLA:CPU is slow at 16-bit elementwise).
        compute_dtype = jax.numpy.float32 if platform == "cpu" else dtype
        return load_model(
            source, model_config, dtype, backend=backend, compute_dtype=compute_dtype, plan=plan, progress=progress,
            dummy=config.load_format == "dummy",
        )

    def _build_loras(self, loaded: LoadedModel) -> LoraSlots:
        """The adapter slots (allocated before the KV cache is sized) and the ``--lora-modules``."""
        c = self.config
        if jax.process_count() > 1:
            raise ValueError("enable_lora: LoRA adapters are not supported in a multi-host launch")
        loras = LoraSlots(sharded_config(self.model_config, loaded.plan), loaded.plan, max_loras=c.max_loras,
                          max_rank=c.max_lora_rank, max_cpu_loras=c.cpu_loras, dtype=loaded.dtype)
        logger.info("LoRA: %d slots of rank %d (%.1f MiB on device)", c.max_loras, c.max_lora_rank,
                    loras.nbytes / 2**20)
        for name, path in c.lora_module_paths:
            loras.add(name, path)
        return loras

    def _build_runner(
        self, loaded: LoadedModel, blocks: int, dtype: jax.numpy.dtype, platform: str, backend: str
    ) -> ModelRunner:
        config = self.config
        buckets = BucketPolicy(config.max_num_seqs, config.max_num_batched_tokens,
                               min_decode_batch=min_decode_batch(dtype, platform),
                               min_mixed_rows=mixed_row_floor(platform, config.max_num_seqs))
        return ModelRunner(
            loaded, num_blocks=blocks, block_size=config.block_size, max_model_len=self.max_model_len, buckets=buckets,
            backend=backend, lora=self.loras,
        )

    @staticmethod
    def _resolve_max_model_len(config: ServeConfig, model_config: ModelConfig) -> int:
        limit = model_config.max_position_embeddings
        if model_config.sliding_window is not None:
            limit = min(limit, model_config.sliding_window)
        if config.max_model_len is None:
            if model_config.sliding_window is not None and model_config.sliding_window < model_config.max_position_embeddings:
                logger.warning("sliding window %d is not supported: max_model_len capped to it", limit)
            return limit
        if config.max_model_len > limit:
            reason = "sliding window" if limit == model_config.sliding_window else "max_position_embeddings"
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's {reason} ({limit})")
        return config.max_model_len

    # ----------------------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        """The constants a client needs: tokenizer, limits, sampling defaults."""
        bm = self.scheduler.block_manager
        return EngineInfo(
            self.tokenizer, self.max_model_len, self.model_config.vocab_size,
            bm.num_usable_blocks * bm.block_size, MappingProxyType(dict(self.default_sampling)), self.grammars,
        )

    def metrics(self) -> EngineMetrics:
        """A snapshot of gauges and counters (call it on the thread that steps the engine)."""
        s, bm, c = self.scheduler, self.scheduler.block_manager, self.counters
        return EngineMetrics(
            num_running=len(s.running), num_waiting=len(s.waiting),
            kv_used_blocks=bm.num_used_blocks, kv_total_blocks=bm.num_usable_blocks,
            num_preemptions=s.num_preemptions, prompt_tokens=c.prompt_tokens,
            generation_tokens=c.generation_tokens, requests_finished=c.requests_finished,
            requests_aborted=c.requests_aborted, steps=c.steps,
            prefix_queries=bm.prefix_queries, prefix_hits=bm.prefix_hits, lora_requests=self._lora_requests(),
            compiles_while_serving=compiles.on_thread(self._thread) - self._compiles_at_ready,
            compiles_pending=self.compiles_pending,
            compile_waits=0 if self.runner.background is None else self.runner.background.waits,
            histograms=self.request_stats.snapshot(),
        )

    def _lora_requests(self) -> tuple[tuple[str, int, int], ...]:
        """(adapter, running, waiting) for every served adapter (empty without LoRA)."""
        if self.loras is None:
            return ()
        refs = [self.loras.get(n) for n in self.loras.names]
        running = collections.Counter(r.lora_id for r in self.scheduler.running)
        waiting = collections.Counter(r.lora_id for r in self.scheduler.waiting)
        return tuple((ref.name, running[ref.lora_id], waiting[ref.lora_id]) for ref in refs)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> AdmittedRequest:
        """Validate a request without queueing it (``interface.admit``; SamplingParamError names the field)."""
        return admit(prompt_token_ids, params, self.info)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None
    ) -> Request:
        """Validate and queue a request (``lora``: an adapter's name). Raises SamplingParamError (with
        ``param``) for requests that cannot run, KeyError for an unknown adapter."""
        admitted = self.check_request(prompt_token_ids, params)
        if lora is not None:
            admitted = dataclasses.replace(admitted, lora_id=self.lora_ref(lora).lora_id)
        return self.enqueue(request_id, admitted)

    def lora_ref(self, name: str) -> LoraRef:
        """A served adapter by name; KeyError if there is none of that name."""
        ref = self.loras.get(name) if self.loras is not None else None
        if ref is None:
            raise LoraNotFoundError(f"no LoRA adapter named {name!r}")
        return ref

    def add_lora(self, name: str, path: str) -> LoraRef:
        """Register an adapter (read and validated now; LoraAdapterError names what is wrong)."""
        if self.loras is None:
            raise ValueError("LoRA adapters need --enable-lora")
        return self.loras.add(name, path)

    def remove_lora(self, name: str) -> LoraRef:
        """Unregister an adapter; refused (LoraInUseError) while requests of it are queued or running."""
        ref = self.lora_ref(name)
        busy = sum(1 for r in self.requests.values() if r.lora_id == ref.lora_id)
        if busy:
            raise LoraInUseError(f"the LoRA adapter {name!r} has {busy} request(s) in flight; unload it when they end")
        return self.loras.remove(name)

    def enqueue(self, request_id: str, admitted: AdmittedRequest) -> Request:
        """Queue an already admitted request (the async client validated it before queueing)."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        params = admitted.params
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        if admitted.lora_id and (self.loras is None or admitted.lora_id not in self.loras.ids):
            raise LoraNotFoundError("the request's LoRA adapter was unloaded before it reached the engine")
        req = Request(request_id, admitted.prompt_token_ids, params, max_tokens=admitted.max_tokens,
                      eos_token_ids=self.eos_token_ids, seed=seed, arrival_time=admitted.arrival_time,
                      lora_id=admitted.lora_id)
        if params.structured is not None:  # compiled off this thread by AsyncEngine; offline callers compile here
            req.grammar = (admitted.grammar or self.grammars.compile(params.structured)).matcher()
        self.scheduler.add(req)
        self.requests[request_id] = req
        self.outputs.add(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.counters.requests_aborted += 1
        self.outputs.remove(request_id)
        return True

    def close(self) -> None:
        """Release follower processes (multi-host) and stop background compiles; the engine cannot
        step afterwards."""
        self.runner.stop_background()
        self.runner.close()

    def idle_work(self) -> bool:
        """With nothing to step: warm up one shape the background compiler finished (so no request
        pays its first run); False when there is nothing to do."""
        return not self.has_unfinished() and self.runner.warm_next()

    @property
    def compiles_pending(self) -> int:
        """Step shapes the background compiler has still to compile (0 without ``background_compile``)."""
        return self.runner.compiles_pending

    @property
    def admitting(self) -> bool:
        """The step in flight carries prompt chunks (requests are arriving) and is still running on
        the device: waiting for more requests before scheduling the next step costs no device time
        (``AsyncEngine._gather_burst``)."""
        step = self._inflight
        if not isinstance(step, InflightStep) or step.handle.tokens is None:  # none, or a pooling step
            return False
        started = any(s.start < s.request.num_prompt_tokens for s in step.launched.scheduled)
        return started and not step.handle.tokens.is_ready()

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    def step(self) -> list[RequestOutput]:
        """Dispatch the next step, then finish the previous one; returns the finished step's outputs.

        With async scheduling the device runs step N+1 while the host applies step N's tokens. The
        previous step is finished first only without async scheduling (a penalty row's in-flight
        token is read on device: ``logits_processors.fill_pending_history``). A step with a grammar row is dispatched in two parts: its
        forward before step N is finished, its sampling after (the matchers must have consumed
        step N's tokens before its mask exists). The in-flight step is a value: ``_dispatch``
        makes it, ``_finish`` consumes it.
        """
        t0 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        outputs: list[RequestOutput] = []
        if prev is not None and not self.async_scheduling:
            outputs += self._finish(prev)
            prev = None
        step = self._dispatch(self.scheduler.schedule(), prev)
        if prev is not None:
            outputs += self._finish(prev)
        if step is not None and step.handle.pending is not None:
            step = self._sample(step)
        if step is not None and not self.async_scheduling:
            outputs += self._finish(step)
            step = None
        self._inflight = step
        if step is not None or prev is not None or outputs:
            self.request_stats.on_step_time(time.perf_counter() - t0)
        outputs += self._failed
        self._failed = []
        return outputs

    def _dispatch(self, sched: SchedulerOutput, prev: InflightStep | None) -> InflightStep | None:
        """Start ``sched`` on the device; tokens ``prev`` is still sampling are read there from its output."""
        if not sched.scheduled:
            return None
        seeds = [s.request.seed for s in sched.scheduled]
        if self.loras is not None:  # every running request's adapter in a slot (the scheduler keeps them <= max_loras)
            self.loras.activate({r.lora_id for r in self.scheduler.running})
        try:
            handle = self.runner.dispatch(sched.scheduled, seeds, prev.handle.rows if prev is not None else {})
        except Exception:
            # A request whose own step inputs (logits-processor rows, grammar mask, sampling row) cannot
            # be built fails alone; the rest are scheduled again next step (nothing was launched). A
            # fault no single request explains is the engine's: it propagates and the loop dies.
            if not self._fail_alone(self.runner.faulty_rows(sched.scheduled)):
                raise
            return None
        return InflightStep(self.results.launch(sched), handle)

    def _sample(self, step: InflightStep) -> InflightStep:
        """Dispatch a grammar step's sampling (its forward ran; the previous step is applied). A
        request whose own mask row cannot be built fails alone, and the step samples without it."""
        try:
            return dataclasses.replace(step, handle=self.runner.sample(step.handle))
        except Exception:
            if not self._fail_alone(self.runner.faulty_grammar_rows(step.handle)):
                raise
            return dataclasses.replace(step, handle=self.runner.sample(step.handle))

    def _fail_alone(self, faulty: list[tuple[Request, Exception]]) -> bool:
        """Fail each request whose own inputs raised (its output goes out with the next step's);
        False when there is none, so the caller re-raises: the fault is the engine's."""
        for req, err in faulty:
            self._failed.append(self.results.fail(req, err))
            self.requests.pop(req.request_id, None)
        return bool(faulty)

    def _finish(self, step: InflightStep) -> list[RequestOutput]:
        """Wait for ``step``'s tokens and apply them; forget the requests that finished."""
        tokens, lp = self.runner.fetch(step.handle)
        if lp is None:
            sampled = SampledTokens(tokens.tolist())
        else:
            sampled = SampledTokens(tokens.tolist(), lp.sampled, lp.top_ids, lp.top_vals)
        outputs = self.results.apply(step.launched, sampled)
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
        loras: list[str | None] | None = None,
    ) -> list[list[int]]:
        """Offline helper: run ``prompts`` (each with its adapter in ``loras``) to completion; return
        each one's output token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{i}-{self._rng.getrandbits(32):08x}" for i in range(len(prompts))]
        for rid, p, sp, lora in zip(ids, prompts, plist, loras or [None] * len(prompts), strict=True):
            self.add_request(rid, p, sp, lora)
        result: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self.requests for rid in ids):
            for out in self.step():
                if out.request_id in result:
                    result[out.request_id].extend(out.new_token_ids)
        return [result[rid] for rid in ids]


def _read_generation_config(directory: Path | None) -> dict:
    if directory is None:
        return {}
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable %s: %s", path, e)
        return {}
