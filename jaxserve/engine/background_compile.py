"""Compiles the step shapes left out of start-up, in a daemon thread, once the engine serves.

The engine becomes ready with ``BucketPolicy.ready_shapes`` compiled; this thread compiles the
rest in ``BucketPolicy.background_order``. A step that has no compiled shape of its family yet (a
logits-processor or grammar step right after start-up) calls ``wait_for``: that shape moves to the
front of the queue and the engine thread waits for it. Compiles here are not the engine thread's,
so ``compiles_while_serving`` (compiles on the engine thread after ready) stays 0; ``pending`` and
``waits`` report this thread's work instead. A compile that fails is re-raised by ``wait_for``
(and logged): the engine's loop then dies, as it would had start-up failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from jaxserve.engine.compilation import StepShape

logger = logging.getLogger(__name__)


class BackgroundCompiler:
    """Runs ``compile_shape`` on each of ``shapes`` in turn in its own thread."""

    def __init__(self, compile_shape: Callable[[StepShape], None], shapes: list[StepShape]) -> None:
        self._compile_shape = compile_shape
        self._todo = list(shapes)
        self._done: set[StepShape] = set()
        self._error: BaseException | None = None
        self._stopped = False
        self._current: StepShape | None = None
        self._cond = threading.Condition()
        self.waits = 0  # times the engine thread waited for a shape
        self.wait_seconds = 0.0
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="jaxserve-compile", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Shapes not compiled yet (the one compiling included)."""
        with self._cond:
            return len(self._todo) + (self._current is not None)

    def _run(self) -> None:
        n = len(self._todo)
        while True:
            with self._cond:
                if self._stopped or not self._todo:
                    break
                self._current = self._todo.pop(0)
            shape = self._current
            try:
                self._compile_shape(shape)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                logger.error("background compile of %s failed: %s", shape, e)
                with self._cond:
                    self._error, self._current = e, None
                    self._cond.notify_all()
                return
            with self._cond:
                self._done.add(shape)
                self._current = None
                self._cond.notify_all()
        if not self._stopped:
            logger.info("background compiles done: %d step shapes in %.1fs", n, time.perf_counter() - self._t0)

    def wait_for(self, shape: StepShape) -> None:
        """Block until ``shape`` is compiled (compiling it next if it is still queued)."""
        t0 = time.perf_counter()
        with self._cond:
            if shape in self._done:
                return
            if shape in self._todo:
                self._todo.remove(shape)
                self._todo.insert(0, shape)
            elif shape != self._current and self._error is None:
                raise RuntimeError(f"step shape {shape} is not among the background compiles")
            logger.info("a step waits for its executable (%s) to compile", shape)
            while shape not in self._done and self._error is None:
                self._cond.wait()
            if shape not in self._done:
                raise RuntimeError(f"the background compile of {shape} failed") from self._error
        self.waits += 1
        self.wait_seconds += time.perf_counter() - t0

    def stop(self, timeout: float | None = 0.0) -> None:
        """Compile nothing more (the shape compiling now still finishes, in the daemon thread);
        waits up to ``timeout`` seconds for the thread to end (None: until it does)."""
        with self._cond:
            self._stopped = True
        self._thread.join(timeout)
