"""Waiting for a server to become ready: the one ``/health`` poll loop of the scripts and CI.

Scripts in this folder import it as a sibling (``from server_health import wait_healthy``: a script
run as a file has its own folder first on ``sys.path``); ``.ci/serve_check.py`` loads it by path;
the tests import ``scripts.server_health``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx


class NotReady(RuntimeError):
    """The server exited, or did not answer ``/health`` 200 in time; the message says which, with
    the end of its log."""


def wait_healthy(
    url: str,
    timeout: float,
    *,
    procs: Sequence[subprocess.Popen] = (),
    log: Path | None = None,
    interval: float = 0.25,
    also: Callable[[], bool] | None = None,
    verify: str | bool = True,
) -> float:
    """Poll ``{url}/health`` every ``interval`` s until it answers 200 (and ``also()`` holds, when
    given; ``verify``: httpx's, e.g. a test CA file for HTTPS); return the seconds waited. ``NotReady`` as soon as one of ``procs`` exits, or once
    ``timeout`` s have passed; its message ends with the last 4000 characters of ``log``."""
    t0 = time.monotonic()
    while True:
        exited = next((p for p in procs if p.poll() is not None), None)
        if exited is not None:
            raise NotReady(f"{url}: the server exited with {exited.returncode}{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2, verify=verify).status_code == 200 and (also is None or also()):
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            raise NotReady(f"{url}: /health not 200 after {timeout:g} s{_tail(log)}")
        time.sleep(interval)


def _tail(log: Path | None) -> str:
    """The end of ``log`` for an error message ('' without one)."""
    if log is None or not log.exists():
        return ""
    return f"; the end of {log}:\n{log.read_text(errors='replace')[-4000:]}"
