"""Two local CPU processes (gloo collectives) serve one model with TP = 2 across them:
process 0 serves HTTP and drives the schedule, process 1 follows the same steps (grammar steps too)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import httpx

from scripts.server_health import wait_healthy
from tests.helpers import lookback_continue


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_tensor_parallel(lookback_model, tmp_path):
    coord, http = _port(), _port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    common = ["--model", str(lookback_model), "--tensor-parallel-size", "2", "--num-processes", "2",
              "--coordinator-address", f"127.0.0.1:{coord}", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
              "--max-model-len", "128", "--kv-cache-memory-gib", "0.03", "--dtype", "float32",
              "--compilation-cache-dir", "", "--port", str(http)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "jaxserve.serve", *common, "--process-id", str(i)],
                         stdout=(tmp_path / f"p{i}.log").open("w"), stderr=subprocess.STDOUT, env=env)
        for i in range(2)
    ]
    try:
        wait_healthy(f"http://127.0.0.1:{http}", 240, procs=procs, log=tmp_path / "p0.log", interval=0.5)
        for prompt in ([10, 11, 12], [200], list(range(30, 60)), [9] * 40 + [100]):
            r = httpx.post(f"http://127.0.0.1:{http}/v1/completions", timeout=60,
                           json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 1,
                                 "return_tokens_as_token_ids": True})
            assert r.status_code == 200, r.text
            got = [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
            assert got == lookback_continue(prompt, 6, eos=2)
        # A grammar step reaches process 1 in two broadcasts (forward inputs, then sampling + mask).
        r = httpx.post(f"http://127.0.0.1:{http}/v1/completions", timeout=60,
                       json={"prompt": "pick:", "max_tokens": 12, "temperature": 1.0, "seed": 2, "n": 2,
                             "structured_outputs": {"regex": "(up|down)-[0-9]{2}"}})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "stop" and re.fullmatch("(up|down)-[0-9]{2}", choice["text"]), choice
    finally:
        procs[0].terminate()
        try:
            assert procs[1].wait(timeout=60) == 0, "the follower must exit when the leader stops"
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
