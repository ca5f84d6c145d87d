"""The soak script's short run: random requests with dropped clients and slow readers leave no
5xx, no leaked KV blocks, no stuck requests and no RSS growth (``scripts/soak.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.server.conftest import API_KEY

SOAK = Path(__file__).parents[2] / "scripts" / "soak.py"


def _soak(server, *args: str) -> dict:
    cmd = [sys.executable, str(SOAK), "--base-url", server.base_url, "--pid", str(server.proc.pid), "--model",
           "lookback", "--api-key", API_KEY, "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def test_soak_short_run_leaves_nothing_behind(lookback_server):
    r = _soak(lookback_server, "--requests", "200", "--concurrency", "16", "--disconnect-fraction", "0.2",
              "--slow-fraction", "0.02", "--max-tokens", "32", "--max-rss-growth-mb", "50")
    assert r["requests"] == 200 and r["disconnected"] >= 20 and r["slow_readers"] >= 1
    assert not [s for s in r["statuses"] if int(s) >= 500] and r["errors"] == {}
    assert r["leaked_kv_blocks"] == 0 and r["running_after"] == 0 and r["waiting_after"] == 0
    assert r["aborted"] >= 1  # some disconnects reached the engine and were aborted
    assert r["compiles_while_serving"] == 0
    assert r["rss_mb_after"] - r["rss_mb_before"] < 50
    assert r["ok"], r
