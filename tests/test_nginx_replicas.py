"""docs/scaling.md's nginx configuration with a real nginx and two lookback replicas
(``scripts/nginx_replicas.py``). Needs Debian's nginx: ``.ci/run`` installs it when it can; where
it cannot be installed this one test is skipped (it tests the environment's proxy, not our code).
Marked ``nginx``: the proxy does not depend on the jax version, so only the 3.11 leg runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "nginx_replicas.py"
NGINX = subprocess.run(["bash", "-c", "command -v nginx || ls /usr/sbin/nginx"], capture_output=True).returncode == 0


@pytest.mark.nginx
@pytest.mark.skipif(not NGINX, reason="nginx is not installed (apt-get install nginx)")
def test_two_replicas_behind_nginx(lookback_model, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--model", str(lookback_model), "--served-model-name", "lookback",
           "--prompt", "paged attention", "--concurrency", "32", "--after", "16", "--long-tokens", "500",
           "--rounds", "10", "--kill-after", "8", "--workdir", str(tmp_path), "--",
           "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--block-size", "4", "--max-model-len", "1024",
           "--kv-cache-memory-gib", "0.0625", "--dtype", "float32"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["first_token"]["difference_ms"] < 20, r  # unbuffered: within a few ms of direct
    spread = r["least_conn"]
    assert spread["ok"] == 32 and sum(spread["per_replica"]) == 32 and min(spread["per_replica"]) >= 8, r
    f = r["failover"]
    assert f["finished"] + f["failed"] == 32 and f["failed"] >= 1 and f["finished"] >= 16, r
    assert f["new_ok"] == 16 and f["new_served_by_survivor"] == 16, r
