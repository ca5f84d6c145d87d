"""The lifecycle every thread-hosted engine shares (``AsyncEngine``, ``AsyncEmbeddingEngine``).

The engine is built inside its own thread by a factory; ``state`` goes LOADING -> READY, or
FAILED when start-up raised (one-line ``error``, traceback at debug level), DEAD when the loop
crashed, STOPPED after a shutdown. ``wait_ready`` raises ``EngineDeadError`` unless READY.
Subclasses implement ``_loop`` (until shutdown) and may hook ``_on_ready`` and ``_on_crash``.
"""

from __future__ import annotations

import enum
import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from jaxserve.engine.interface import EngineDeadError

logger = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # start-up failed
    DEAD = "dead"  # the loop crashed after start-up
    STOPPED = "stopped"


class EngineThread:
    """Builds an engine with ``factory`` in a daemon thread named ``thread_name``, then runs ``_loop``."""

    thread_name = "jaxserve-engine"

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self.state = EngineState.LOADING
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until start-up finished; raise EngineDeadError if it failed."""
        self._ready.wait(timeout)
        if self.state is not EngineState.READY:
            raise EngineDeadError(self.error or f"engine is {self.state.value}")

    def join(self, timeout: float | None = None) -> None:
        """Block until the engine thread ended (stopped, failed to start, or crashed)."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_ready(self) -> bool:
        return self.state is EngineState.READY

    def _on_ready(self, engine: Any) -> None:
        """Take what the client API reads from the built engine (before READY is published)."""

    def _on_crash(self, err: EngineDeadError) -> None:
        """Fail whatever is waiting once ``_loop`` crashed."""

    def _loop(self, engine: Any) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - report any start-up failure
            cause = " ".join(str(e).split())  # one line, however the exception spells it
            self.error = f"engine start-up failed: {type(e).__name__}: {cause[:500]}"
            logger.error("%s (the traceback is logged at --log-level debug)", self.error)
            logger.debug("engine start-up traceback:\n%s", traceback.format_exc())
            self.state = EngineState.FAILED
            self._ready.set()
            return
        self._on_ready(engine)
        self.state = EngineState.READY
        self._ready.set()
        try:
            self._loop(engine)
        except BaseException as e:  # noqa: BLE001 - the loop must report, not vanish
            self.error = f"engine loop crashed: {e}"
            logger.error("%s\n%s", self.error, traceback.format_exc())
            self.state = EngineState.DEAD
            self._on_crash(EngineDeadError(self.error))
