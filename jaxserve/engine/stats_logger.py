"""The periodic stats line (vLLM's, off with ``--disable-log-stats``): throughput since the last
line, running and waiting requests, KV-cache usage and the prefix-cache hit rate.

Reads the metrics snapshot ``/metrics`` reads, from its own thread; logs only while the engine has
work or did some since the last line, so an idle server stays quiet.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


class StatsLogger:
    """Every ``interval`` seconds, one INFO line when the engine was busy."""

    def __init__(self, engine: AsyncEngine, interval: float = 10.0) -> None:
        self.engine = engine
        self.interval = interval
        self._last: tuple[float, int, int, int, int] | None = None  # time, prompt, generated, hits, queries

    def start(self) -> None:
        threading.Thread(target=self._run, name="jaxserve-stats", daemon=True).start()

    def _run(self) -> None:
        self.line(time.monotonic())  # the baseline
        while self.engine.is_ready:
            time.sleep(self.interval)
            text = self.line(time.monotonic())
            if text:
                logger.info("%s", text)

    def line(self, now: float) -> str | None:
        """The stats since the previous call, or None when nothing ran or waits."""
        m = self.engine.metrics()
        if m is None:
            return None
        current = (now, m.prompt_tokens, m.generation_tokens, m.prefix_hits, m.prefix_queries)
        last, self._last = self._last, current
        if last is None:
            return None
        dt = max(now - last[0], 1e-9)
        prompt, generated = current[1] - last[1], current[2] - last[2]
        if not (prompt or generated or m.num_running or m.num_waiting):
            return None
        hits, queries = current[3] - last[3], current[4] - last[4]
        return (
            f"prompt throughput {prompt / dt:.1f} tokens/s, generation throughput {generated / dt:.1f} tokens/s, "
            f"running {m.num_running} reqs, waiting {m.num_waiting} reqs, "
            f"KV cache usage {100 * m.kv_used_blocks / m.kv_total_blocks:.1f}%, "
            f"prefix cache hit rate {100 * hits / queries if queries else 0.0:.1f}%"
        )
