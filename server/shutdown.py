"""Graceful shutdown (SIGTERM, Ctrl-C): stop accepting, let running requests finish, abort the rest.

``Drain`` is the server's shutdown state and ``DrainMiddleware`` its gate: it counts the HTTP
requests in flight (a stream counts until its last byte) and, once draining, answers every new
request with OpenAI's 503 body (``/health``: "draining"; ``/metrics`` still answers). After
``--shutdown-timeout`` seconds the generate engines end every open request with an error (an
error event then ``[DONE]`` for a stream, a 503 for the others). ``serve.py`` starts the drain on
the first signal and stops uvicorn when it is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from jaxserve.engine.interface import EngineDeadError
from jaxserve.server.errors import error_body

logger = logging.getLogger(__name__)

ABORT_GRACE_S = 5.0  # after aborting, how long the aborted requests get to send their error
_ALWAYS_OPEN = ("/metrics",)


class Drain:
    """Requests in flight and whether the server is draining (both touched on the event loop only)."""

    def __init__(self, engines: Sequence[object]) -> None:
        self.engines = engines
        self.draining = False
        self.active = 0

    async def run(self, timeout: float) -> None:
        """Stop accepting; wait up to ``timeout`` s for the requests in flight; then abort the rest."""
        self.draining = True
        logger.info("shutting down: %d request(s) in flight, waiting up to %gs for them", self.active, timeout)
        if await self._wait_idle(timeout):
            return
        logger.warning("shutdown: aborting %d request(s) still running after %gs", self.active, timeout)
        err = EngineDeadError(f"the server is shutting down: the request was aborted after {timeout:g}s")
        for engine in self.engines:
            fail_all = getattr(engine, "fail_all", None)  # generate engines; embedding calls are short
            if fail_all is not None:
                fail_all(err)
        await self._wait_idle(ABORT_GRACE_S)

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active == 0


class DrainMiddleware:
    """Counts requests in flight; while draining, 503 in OpenAI's error shape for every new one."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.drain.draining and path not in _ALWAYS_OPEN:
            message = "draining" if path == "/health" else "the server is shutting down"
            await JSONResponse(error_body(503, message), status_code=503)(scope, receive, send)
            return
        self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.active -= 1
