"""Runs the LLMEngine in its own thread and feeds each request's outputs to an asyncio queue.

The engine thread never waits on a client: outputs are handed to the event loop with
``call_soon_threadsafe`` into unbounded per-request queues, so a slow reader only grows its own
queue. Requests and aborts reach the thread through a command queue, drained before every step.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.output_processor import RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # start-up failed
    DEAD = "dead"  # the loop crashed after start-up
    STOPPED = "stopped"


class EngineDeadError(RuntimeError):
    """The engine cannot serve (failed start-up or crashed loop)."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queue_size`` allows."""


_DONE = object()


class AsyncEngine:
    """Thread-hosted engine with an asyncio API: ``generate`` yields RequestOutputs."""

    def __init__(self, factory: Callable[[], LLMEngine], *, max_queue_size: int | None = None) -> None:
        self._factory = factory
        self.engine: LLMEngine | None = None
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.max_queue_size = max_queue_size
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until start-up finished; raise EngineDeadError if it failed."""
        self._ready.wait(timeout)
        if self.state is not EngineState.READY:
            raise EngineDeadError(self.error or f"engine is {self.state.value}")

    def shutdown(self) -> None:
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_ready(self) -> bool:
        return self.state is EngineState.READY

    # ------------------------------------------------------------------ request API (event loop)
    def check(self) -> LLMEngine:
        if self.state is not EngineState.READY or self.engine is None:
            raise EngineDeadError(self.error or f"the engine is {self.state.value}")
        return self.engine

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs until it finishes.

        Closing the iterator early (client gone) aborts the request and frees its blocks.
        """
        engine = self.check()
        engine.check_request(prompt_token_ids, params)  # raises before anything is queued
        if self.max_queue_size is not None and self.num_waiting() >= self.max_queue_size:
            raise QueueFullError(f"the server is busy: {self.max_queue_size} requests are already waiting")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request_id] = (loop, q)
        self._commands.put(("add", (request_id, prompt_token_ids, params)))
        finished = False
        try:
            while True:
                item = await q.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def num_waiting(self) -> int:
        e = self.engine
        return 0 if e is None else len(e.scheduler.waiting) + self._commands.qsize()

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # loop closed
                pass

    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - report any start-up failure
            self.error = f"engine start-up failed: {e}"
            logger.error("%s\n%s", self.error, traceback.format_exc())
            self.state = EngineState.FAILED
            self._ready.set()
            return
        self.state = EngineState.READY
        self._ready.set()
        engine = self.engine
        try:
            while True:
                block = not engine.has_unfinished()
                try:
                    cmd, arg = self._commands.get(block=block, timeout=None if block else 0)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd == "stop":
                        self.state = EngineState.STOPPED
                        self._fail_all(EngineDeadError("the engine is shutting down"))
                        engine.close()
                        return
                    self._handle(engine, cmd, arg)
                    try:
                        cmd, arg = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if engine.has_unfinished():
                    for out in engine.step():
                        self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
            self.error = f"engine loop crashed: {e}"
            logger.error("%s\n%s", self.error, traceback.format_exc())
            self.state = EngineState.DEAD
            self._fail_all(EngineDeadError(self.error))

    def _handle(self, engine: LLMEngine, cmd: str, arg: Any) -> None:
        if cmd == "add":
            request_id, prompt, params = arg
            with self._lock:
                alive = request_id in self._streams
            if not alive:  # the client left before the request reached the engine
                return
            try:
                engine.add_request(request_id, prompt, params)
            except Exception as e:  # noqa: BLE001 - a bad request must not stop the loop
                self._deliver(request_id, e)
        elif cmd == "abort":
            engine.abort(arg)

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._deliver(rid, err)
