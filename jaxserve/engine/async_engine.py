"""Runs the LLMEngine in its own thread: the narrow client the server talks to.

The server sees only ``info`` (tokenizer and limits, fixed once ready), ``metrics()`` (a snapshot
the engine thread publishes after every loop turn) and ``submit`` (admission: validate every
choice and apply the queue rule, then queue them). Typed commands (``AddRequest``, ``Shutdown``)
reach the thread through a queue drained before every step; so do ended submissions, whose
unfinished choices it aborts. The engine thread never waits on a client: outputs are handed to the event loop with
``call_soon_threadsafe`` into one bounded outbox per submission; a reader that falls
``max_undelivered`` outputs behind is dropped (its backlog discarded, its choices aborted, a
``SlowReaderError`` left for it) and logged. ``fail_all`` ends every open submission with an error
(the server's shutdown after its drain timeout).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable

from jaxserve.engine.engine_thread import EngineState, EngineThread
from jaxserve.engine.grammar import COMPILE_TIMEOUT_S, CompiledGrammar, GrammarError
from jaxserve.engine.interface import (
    AdmittedRequest,
    EngineDeadError,
    EngineInfo,
    EngineMetrics,
    QueueFullError,
    RequestFailedError,
    admit,
    check_queue,
)
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.lora_slots import LoraNotFoundError, LoraRef
from jaxserve.engine.output_processor import RequestOutput
from jaxserve.sampling_params import SamplingParamError, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "EngineState", "QueueFullError", "RequestFailedError", "SlowReaderError",
           "Submission"]

MAX_UNDELIVERED = 1000  # outputs a stream may have waiting for its reader (--max-undelivered-chunks)
POLL_S = 0.002  # AsyncEngine._gather_burst looks this often whether the step in flight is done


class SlowReaderError(RuntimeError):
    """A client fell too far behind its stream; its request was aborted."""


@dataclasses.dataclass(frozen=True)
class AddRequest:
    request_id: str
    request: AdmittedRequest


@dataclasses.dataclass(frozen=True)
class Shutdown:
    pass


@dataclasses.dataclass(frozen=True)
class LoraCommand:
    """Load (``path`` set) or unload an adapter on the engine thread; the outcome goes to ``future``."""

    name: str
    path: str | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


Command = AddRequest | Shutdown | LoraCommand


class Outbox:
    """One submission's undelivered outputs, filled on the event loop; never more than ``limit``
    (None: unbounded, for a reader that collects in-process, a non-streaming request).

    Overflowing drops the reader: the backlog is discarded, a SlowReaderError is all that is left
    to read, and the unfinished choices are aborted (their KV blocks freed) without waiting for it.
    """

    def __init__(self, engine: AsyncEngine, ids: list[str], unfinished: set[int], limit: int | None) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.dropped = False
        self._engine, self._ids, self._unfinished, self._limit = engine, ids, unfinished, limit

    def put(self, index: int, item: RequestOutput | BaseException) -> None:
        """Queue one output (or error) for choice ``index``; past ``limit`` queued, drop the reader (see the class).
        Errors are always queued; after a drop, nothing more is."""
        if self.dropped:
            return
        if self._limit is None or self.queue.qsize() < self._limit or isinstance(item, BaseException):
            self.queue.put_nowait((index, item))
            return
        self.dropped = True
        while not self.queue.empty():
            self.queue.get_nowait()
        rid = self._ids[0].rsplit("-", 1)[0]
        logger.warning("request %s: the client fell %d outputs behind; dropped and aborted", rid, self._limit)
        self.queue.put_nowait((index, SlowReaderError(
            f"the client fell {self._limit} outputs behind the stream; the request was aborted")))
        self._engine._release(self._ids, self._unfinished)


def _put_all(batch: list[tuple[Outbox, int, RequestOutput | BaseException]]) -> None:
    """On the event loop: one step's outputs into their outboxes."""
    for outbox, index, item in batch:
        outbox.put(index, item)


class Submission:
    """The engine requests behind one client request (choice ``i`` is ``{request_id}-{i}``).

    Iterate ``outputs()`` for ``(choice, RequestOutput)`` as the engine produces them. Leaving it
    early, ``close()``, or dropping the object aborts every unfinished choice (frees its blocks).
    """

    def __init__(self, engine: AsyncEngine, ids: list[str], outbox: Outbox, unfinished: set[int]) -> None:
        self.ids = ids
        self._queue = outbox.queue
        self._open = unfinished  # shared with the outbox and the finalizer: choices not finished yet
        self._finalizer = weakref.finalize(self, engine._release, ids, self._open)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(choice, output)`` until every choice has finished; an error queued for this submission is raised.
        Leaving the iteration early aborts the unfinished choices (``close``)."""
        try:
            while self._open:
                i, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self._open.discard(i)
                yield i, item
        finally:
            self.close()

    def close(self) -> None:
        self._finalizer()


class AsyncEngine(EngineThread):
    """Thread-hosted engine with an asyncio API (``submit`` -> ``Submission``)."""

    task = "generate"  # the endpoints it serves (AsyncEmbeddingEngine: "embed")
    # _gather_burst: an idle engine's burst goes on while requests come burst_gap_s apart, for at
    # most burst_window_s (0: never gather); during a prompt step, busy_gap_s apart (at most 10 gaps)
    burst_gap_s = 0.005
    burst_window_s = 0.03
    busy_gap_s = 0.02

    def __init__(
        self, factory: Callable[[], LLMEngine], *, max_queue_size: int | None = None, log_requests: bool = False,
        max_undelivered: int = MAX_UNDELIVERED,
    ) -> None:
        super().__init__(factory)
        self.max_undelivered = max_undelivered
        self.log_requests = log_requests
        self.max_queue_size = max_queue_size
        self._info: EngineInfo | None = None
        self._metrics: EngineMetrics | None = None
        self._loras: dict[str, LoraRef] = {}  # the served adapters, published by the engine thread
        self._unpublished_adds = 0  # adds submitted that the last metrics snapshot does not count
        self._commands: queue.Queue[Command] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Outbox, int]] = {}
        # Ended submissions (ids, unfinished choices). A deque, not the command queue: a submission
        # can end inside garbage collection on any thread, where taking a lock could deadlock.
        self._ended: collections.deque[tuple[list[str], set[int]]] = collections.deque()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle (start, wait_ready, join: EngineThread)
    def shutdown(self) -> None:
        self._commands.put(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ client API (event loop)
    @property
    def info(self) -> EngineInfo:
        """Tokenizer and limits; EngineDeadError unless the engine serves."""
        if self.state is not EngineState.READY or self._info is None:
            raise EngineDeadError(self.error or f"the engine is {self.state.value}")
        return self._info

    def metrics(self) -> EngineMetrics | None:
        """The latest snapshot (None before the engine started)."""
        return self._metrics

    @property
    def loras(self) -> list[LoraRef]:
        """The LoRA adapters served now (a snapshot)."""
        return list(self._loras.values())

    async def load_lora(self, name: str, path: str) -> None:
        """Register an adapter on the engine thread (LoraAdapterError / ValueError name the problem)."""
        await self._lora_command(name, path)

    async def unload_lora(self, name: str) -> None:
        """Unregister an adapter; KeyError if unknown, LoraInUseError while requests of it are in flight."""
        await self._lora_command(name, None)

    async def _lora_command(self, name: str, path: str | None) -> None:
        self.info  # noqa: B018 - EngineDeadError unless the engine serves
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(LoraCommand(name, path, future, loop))
        await future

    async def compile_grammars(
        self, params: list[SamplingParams], timeout: float = COMPILE_TIMEOUT_S
    ) -> list[CompiledGrammar | None]:
        """Each choice's structured-output grammar, compiled in a worker thread (cached by spec).

        Raises GrammarError (a SamplingParamError naming the field) for a spec llguidance rejects
        or one that takes longer than ``timeout`` seconds to compile.
        """
        specs = {p.structured for p in params if p.structured is not None}
        if not specs:
            return [None] * len(params)
        compiler = self.info.grammars
        if compiler is None:
            raise GrammarError(next(iter(specs)), "structured outputs are not supported by this engine")
        compiled = {}
        for spec in specs:
            try:
                compiled[spec] = await asyncio.wait_for(asyncio.to_thread(compiler.compile, spec), timeout)
            except TimeoutError:
                raise GrammarError(spec, f"the grammar took longer than {timeout:g}s to compile") from None
        return [compiled[p.structured] if p.structured is not None else None for p in params]

    def submit(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams],
        grammars: list[CompiledGrammar | None] | None = None, *, bounded: bool = True, lora: str | None = None,
    ) -> Submission:
        """Admit and queue one engine request per choice, or raise before anything is queued.

        ``grammars``: each choice's compiled structured output (``compile_grammars``); without
        them the engine thread compiles. ``bounded``: a reader that falls ``max_undelivered`` outputs
        behind is dropped (a stream's; a non-streaming request collects them as they arrive).
        ``lora``: the adapter every choice runs with (a name in ``lora_names``).
        Raises SamplingParamError (a bad choice), QueueFullError, EngineDeadError or KeyError (``lora``).
        """
        info = self.info
        if lora is not None and lora not in self._loras:
            raise LoraNotFoundError(f"The model `{lora}` does not exist (its LoRA adapter was unloaded).")
        lora_id = 0 if lora is None else self._loras[lora].lora_id
        admitted = [dataclasses.replace(admit(p, sp, info), lora_id=lora_id) for p, sp in zip(prompts, params, strict=True)]
        if grammars is not None:
            admitted = [dataclasses.replace(a, grammar=g) for a, g in zip(admitted, grammars, strict=True)]
        loop = asyncio.get_running_loop()
        ids = [f"{request_id}-{i}" for i in range(len(admitted))]
        unfinished = set(range(len(ids)))
        outbox = Outbox(self, ids, unfinished, self.max_undelivered if bounded else None)
        with self._lock:
            if ids[0] in self._streams:  # a client reused a running request's X-Request-Id
                raise SamplingParamError("X-Request-Id", f"request id {request_id!r} is already in use by a running "
                                         "request")
            waiting = (self._metrics.num_waiting if self._metrics else 0) + self._unpublished_adds
            check_queue(waiting, len(admitted), self.max_queue_size)
            self._unpublished_adds += len(admitted)
            for i, rid in enumerate(ids):
                self._streams[rid] = (loop, outbox, i)
        if self.log_requests:
            logger.info("request %s: %d prompt tokens, %d choice(s), %s", request_id, len(prompts[0]), len(prompts),
                        params[0])
        for rid, req in zip(ids, admitted, strict=True):
            self._commands.put(AddRequest(rid, req))
        return Submission(self, ids, outbox, unfinished)

    def _release(self, ids: list[str], unfinished: set[int]) -> None:
        """A submission ended (any thread): the engine thread aborts its unfinished choices."""
        self._ended.append((ids, set(unfinished)))

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand each item to its submission's outbox, in order: one ``call_soon_threadsafe`` (one
        wake-up of the event loop) per loop and step, not per token."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Outbox, int, RequestOutput | BaseException]]] = {}
        with self._lock:
            for request_id, item in items:
                target = self._streams.get(request_id)
                if target is not None:
                    loop, outbox, index = target
                    batches.setdefault(loop, []).append((outbox, index, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # loop closed
                pass

    def _on_ready(self, engine: LLMEngine) -> None:
        self._info, self._metrics = engine.info, engine.metrics()
        self._publish_loras(engine)

    def _publish_loras(self, engine: LLMEngine) -> None:
        loras = engine.loras
        self._loras = {} if loras is None else {n: loras.get(n) for n in loras.names}

    def _on_crash(self, err: EngineDeadError) -> None:
        self.fail_all(err)

    def _loop(self, engine: LLMEngine) -> None:
        """Drain commands (waiting for one when idle), step, publish metrics; until Shutdown. When
        idle, warm up shapes the background compiler finished, and wake every 0.5 s while it runs."""
        while True:
            idle = not engine.has_unfinished()
            block = idle and not engine.idle_work()
            admitting = engine.admitting
            try:
                wait = 0.5 if engine.compiles_pending else None
                cmd: Command | None = self._commands.get(block=block, timeout=wait if block else 0)
            except queue.Empty:
                cmd = None
            adds = self._drain(engine, cmd)
            if adds is not None and (idle and adds >= 2 or admitting):
                adds = self._gather_burst(engine, adds, busy=admitting)
            if adds is None:
                return
            self._abort_ended(engine)
            outputs = engine.step() if engine.has_unfinished() else []
            with self._lock:  # the snapshot now counts these adds among the waiting
                self._metrics = engine.metrics()
                self._unpublished_adds -= adds
            # a request that failed alone ends its submission with the error
            self._deliver_all([(out.request_id, out if out.error is None else RequestFailedError(out.error))
                               for out in outputs])

    def _drain(self, engine: LLMEngine, cmd: Command | None) -> int | None:
        """Handle ``cmd`` and every command queued behind it; the requests added, None on Shutdown."""
        adds = 0
        while cmd is not None:
            if isinstance(cmd, Shutdown):
                self.state = EngineState.STOPPED
                self.fail_all(EngineDeadError("the engine is shutting down"))
                engine.close()
                return None
            adds += self._handle(engine, cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                cmd = None
        return adds

    def _gather_burst(self, engine: LLMEngine, adds: int, busy: bool) -> int | None:
        """Requests are arriving together (clients that send at once reach the engine over a few
        ms, one chat template and tokenization after another): keep taking commands while the next
        comes within the gap, so that the burst's prompts share one prefill step instead of
        splitting into steps that each pay a mixed step's fixed cost and queue behind one another
        (docs/benchmarks.md §15, "Serving timeline"). The loop calls it when an idle engine
        received several requests at once (``burst_gap_s``, at most ``burst_window_s``: the device
        waits), or when requests may arrive while a step with prompt chunks runs (``busy``:
        ``busy_gap_s``, and the wait ends when that step is done, so the device does not wait). A
        lone request on an idle engine never waits."""
        now = time.monotonic()
        gap, deadline = (self.busy_gap_s, now + 10 * self.busy_gap_s) if busy else (
            self.burst_gap_s, now + self.burst_window_s)
        last = now
        while adds is not None and self.burst_window_s > 0:
            now = time.monotonic()
            if now >= deadline or now - last >= gap or (busy and not engine.admitting):
                break
            try:
                cmd = self._commands.get(timeout=min(POLL_S, deadline - now, last + gap - now))
            except queue.Empty:
                continue
            last = time.monotonic()
            more = self._drain(engine, cmd)
            adds = None if more is None else adds + more
        return adds

    def _abort_ended(self, engine: LLMEngine) -> None:
        while self._ended:
            ids, unfinished = self._ended.popleft()
            with self._lock:
                for rid in ids:
                    self._streams.pop(rid, None)
            for i in sorted(unfinished):
                engine.abort(ids[i])

    def _handle(self, engine: LLMEngine, cmd: AddRequest | LoraCommand) -> int:
        """Queue an admitted request (skipped if its submission already ended); returns 1. A LoRA
        command runs here, between steps, and returns 0."""
        if isinstance(cmd, LoraCommand):
            self._run_lora_command(engine, cmd)
            return 0
        with self._lock:
            alive = cmd.request_id in self._streams
        if not alive:  # the client left before the request reached the engine
            return 1
        try:
            engine.enqueue(cmd.request_id, cmd.request)
        except Exception as e:  # noqa: BLE001 - a request the engine refuses must not stop the loop
            self._deliver(cmd.request_id, e)
        return 1

    def _run_lora_command(self, engine: LLMEngine, cmd: LoraCommand) -> None:
        try:
            if cmd.path is None:
                engine.remove_lora(cmd.name)
            else:
                engine.add_lora(cmd.name, cmd.path)
            self._publish_loras(engine)
            outcome = None
        except Exception as e:  # noqa: BLE001 - the caller gets it as its HTTP error
            outcome = e

        def settle() -> None:
            if cmd.future.done():
                return
            if outcome is None:
                cmd.future.set_result(None)
            else:
                cmd.future.set_exception(outcome)

        try:
            cmd.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # loop closed
            pass

    def fail_all(self, err: Exception) -> None:
        """End every open submission with ``err`` (any thread); each aborts its choices as it ends."""
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._deliver(rid, err)
