"""Runs an embedding engine (``EmbeddingEngine`` or ``PoolingEngine``) in its own thread, off the event loop;
the client the server talks to.

The lifecycle of ``AsyncEngine`` (``engine_thread.EngineThread``: ``state``, ``start``, ``wait_ready``, ``join``)
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
from collections.abc import Callable
from typing import Protocol

import numpy as np

from jaxserve.engine.engine_thread import EngineState, EngineThread
from jaxserve.engine.embedding_engine import EmbedInfo, check_inputs
from jaxserve.engine.interface import EngineDeadError, EngineMetrics


class Embeds(Protocol):
    """What this host needs of an engine: ``EmbeddingEngine`` (cache-free) or ``PoolingEngine`` (paged)."""

    @property
    def info(self) -> EmbedInfo: ...

    def embed(self, seqs: list[list[int]]) -> np.ndarray: ...

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


class AsyncEmbeddingEngine(EngineThread):
    """Thread-hosted embedding engine (encoder, or decoder embedder) with an asyncio ``embed``."""

    task = "embed"
    thread_name = "jaxserve-embed"

    def __init__(self, factory: Callable[[], Embeds], *, log_requests: bool = False) -> None:
        super().__init__(factory)
        self.log_requests = log_requests
        self._info: EmbedInfo | None = None
        self._calls: queue.Queue[_Call | None] = queue.Queue()

    def shutdown(self) -> None:
        self._calls.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

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

    def _on_ready(self, engine: Embeds) -> None:
        self._info = engine.info

    def _on_crash(self, err: EngineDeadError) -> None:
        self._fail_pending(err)

    def _loop(self, engine: Embeds) -> None:
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
                self._fail_pending(EngineDeadError("the engine is shutting down"))
                return

    def _fail_pending(self, err: Exception) -> None:
        while not self._calls.empty():
            c = self._calls.get_nowait()
            if c is not None:
                c.loop.call_soon_threadsafe(_resolve, c.future, err)
