"""Runs the EmbeddingEngine in its own thread, off the event loop; the client the server talks to.

Same lifecycle as ``AsyncEngine`` (``state``, ``info``, ``start``/``wait_ready``/``join``/``shutdown``)
so ``serve.py`` and the app treat both alike; ``task`` says which endpoints it serves. Each
``embed`` call is admitted on the event loop (``check_inputs``), then queued; the engine thread
takes every queued call at once and embeds their sequences together (batched by length bucket),
handing each call its rows back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import traceback
from collections.abc import Callable

import numpy as np

from jaxserve.engine.async_engine import EngineState
from jaxserve.engine.embedding_engine import EmbeddingEngine, EmbedInfo, check_inputs
from jaxserve.engine.interface import EngineDeadError, EngineMetrics

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Call:
    seqs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _resolve(future: asyncio.Future, result: np.ndarray | BaseException) -> None:
    if future.done():  # the client left
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class AsyncEmbeddingEngine:
    """Thread-hosted encoder with an asyncio ``embed``."""

    task = "embed"

    def __init__(self, factory: Callable[[], EmbeddingEngine], *, log_requests: bool = False) -> None:
        self._factory = factory
        self.log_requests = log_requests
        self.state = EngineState.LOADING
        self.error: str | None = None
        self._info: EmbedInfo | None = None
        self._calls: queue.Queue[_Call | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jaxserve-embed", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        self._ready.wait(timeout)
        if self.state is not EngineState.READY:
            raise EngineDeadError(self.error or f"engine is {self.state.value}")

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def shutdown(self) -> None:
        self._calls.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def info(self) -> EmbedInfo:
        if self.state is not EngineState.READY or self._info is None:
            raise EngineDeadError(self.error or f"the engine is {self.state.value}")
        return self._info

    def metrics(self) -> EngineMetrics | None:
        return None  # the encoder has no KV cache or queue gauges

    async def embed(self, seqs: list[list[int]]) -> np.ndarray:
        """``[len(seqs), hidden]`` float32; SamplingParamError (bad input) or EngineDeadError first."""
        check_inputs(seqs, self.info)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self.log_requests:
            logger.info("embedding request: %d inputs, %d tokens", len(seqs), sum(map(len, seqs)))
        self._calls.put(_Call(seqs, loop, future))
        return await future

    def _run(self) -> None:
        try:
            engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - report any start-up failure
            self.error = f"engine start-up failed: {type(e).__name__}: {' '.join(str(e).split())[:500]}"
            logger.error("%s (the traceback is logged at --log-level debug)", self.error)
            logger.debug("engine start-up traceback:\n%s", traceback.format_exc())
            self.state = EngineState.FAILED
            self._ready.set()
            return
        self._info = engine.info
        self.state = EngineState.READY
        self._ready.set()
        try:
            self._loop(engine)
        except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
            self.error = f"engine loop crashed: {e}"
            logger.error("%s\n%s", self.error, traceback.format_exc())
            self.state = EngineState.DEAD
        self._fail_pending(EngineDeadError(self.error or "the engine is shutting down"))

    def _loop(self, engine: EmbeddingEngine) -> None:
        """Wait for a call, take every queued one, embed them together; until shutdown (None)."""
        while True:
            calls = [self._calls.get()]
            while not self._calls.empty() and calls[-1] is not None:
                calls.append(self._calls.get_nowait())
            live = [c for c in calls if c is not None and not c.future.done()]
            if live:
                try:
                    vectors = engine.embed([s for c in live for s in c.seqs])
                except BaseException as e:
                    for c in live:
                        c.loop.call_soon_threadsafe(_resolve, c.future, EngineDeadError(f"engine loop crashed: {e}"))
                    raise
                start = 0
                for c in live:
                    rows = vectors[start: start + len(c.seqs)]
                    start += len(c.seqs)
                    c.loop.call_soon_threadsafe(_resolve, c.future, rows)
            if calls[-1] is None:
                self.state = EngineState.STOPPED
                return

    def _fail_pending(self, err: Exception) -> None:
        while not self._calls.empty():
            c = self._calls.get_nowait()
            if c is not None:
                c.loop.call_soon_threadsafe(_resolve, c.future, err)
