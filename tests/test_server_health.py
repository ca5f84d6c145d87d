"""``scripts/server_health.wait_healthy``, the one wait-for-ready loop of scripts, CI and the server
tests: it returns once ``/health`` is 200, and fails fast on an exited process or a timeout."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from scripts.server_health import NotReady, wait_healthy


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[int]]]:
    """A loopback server whose ``/health`` answers the status at the head of the list (the last one stays)."""
    statuses = [503, 503, 200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            code = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            self.send_response(code if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", statuses
    server.shutdown()
    server.server_close()


def test_waits_for_200_then_for_also(health_server):
    url, statuses = health_server
    wait_healthy(url, 10, interval=0.01)
    assert statuses == [200]  # both 503s were polled through
    calls = []
    wait_healthy(url, 10, interval=0.01, also=lambda: calls.append(1) or len(calls) == 3)
    assert len(calls) == 3


def test_times_out_and_names_the_log(health_server, tmp_path):
    url, statuses = health_server
    statuses[:] = [503]
    log = tmp_path / "server.log"
    log.write_text("engine still compiling")
    with pytest.raises(NotReady, match=r"/health not 200 after 0.2 s; the end of .*server.log:\nengine still compiling"):
        wait_healthy(url, 0.2, log=log, interval=0.01)


def test_an_exited_process_ends_the_wait(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(NotReady, match="the server exited with 3"):
        wait_healthy("http://127.0.0.1:9", 60, procs=[proc])  # nothing listens: only the exit can end it quickly
