"""The server process: start-up failures end it in one sentence (exit ≠ 0); over TLS, an engine loop
that dies fails every waiting client (no hang), and the process exits 1 with the cause in its log."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from scripts.server_health import wait_healthy
from tests.server.conftest import _free_port

# Few compiled shapes (start-up is mostly compiling): one sequence, 16-token steps (the request that
# crashes the engine waits in the queue while the stream runs).
TINY = ["--max-num-seqs", "1", "--max-num-batched-tokens", "16", "--block-size", "4", "--max-model-len", "256",
        "--kv-cache-memory-gib", "0.0625", "--dtype", "float32"]
CRASH_MAX_TOKENS = 99  # the wrapper's engine dies on the first step that runs a request asking for this


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxserve.serve", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _bad_yaml(tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("model: m\nmax_num_sequences: 4\n")
    return ["--config", str(tmp / "bad.yaml")]


STARTUP_FAILURES = [  # (name, args(tmp, model), words the one line must hold)
    ("bad model path", lambda tmp, m: ["--model", str(tmp / "nowhere")], "does not exist"),
    ("bad YAML key", lambda tmp, m: _bad_yaml(tmp), "unknown config key 'max_num_sequences'"),
    ("bad flag value", lambda tmp, m: ["--model", str(m), "--max-num-seqs", "many"], "max_num_seqs: 'many' is not"),
    ("bad choice", lambda tmp, m: ["--model", str(m), "--dtype", "float8"], "dtype: 'float8' is not allowed"),
    ("cap out of range", lambda tmp, m: ["--model", str(m), "--max-logprobs", "50"], "max_logprobs must be in [0, 20]"),
    ("TLS key without certificate", lambda tmp, m: ["--model", str(m), "--ssl-keyfile", str(m / "config.json")],
     "give both"),
    ("TP larger than the devices", lambda tmp, m: ["--model", str(m), "--tensor-parallel-size", "64"],
     "tensor_parallel_size 64 needs 64 devices"),
]


@pytest.mark.parametrize(("name", "args", "words"), STARTUP_FAILURES, ids=[c[0] for c in STARTUP_FAILURES])
def test_startup_failure_is_one_sentence(tmp_path, lookback_model, name, args, words):
    r = _run([*args(tmp_path, lookback_model), "--port", str(_free_port())], tmp_path)
    _assert_one_line(r, 2, words)


def test_port_in_use_is_one_sentence(tmp_path, lookback_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _run(["--model", str(lookback_model), "--port", str(port)], tmp_path)
    _assert_one_line(r, 2, f"cannot listen on 127.0.0.1:{port}")


def _assert_one_line(r: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and r.stderr.rstrip().endswith(lines[0]) and words in lines[0], r.stderr[-3000:]


# Runs the real server with the engine's step patched: each step takes 20 ms, and the first step
# that runs a request asking for CRASH_MAX_TOKENS tokens raises (an engine-loop fault).
WRAPPER = f"""
import sys, time
from jaxserve.engine.llm_engine import LLMEngine
real_step = LLMEngine.step
def step(self):
    time.sleep(0.02)
    if any(r.params.max_tokens == {CRASH_MAX_TOKENS} for r in self.requests.values()):
        raise RuntimeError("injected engine-loop fault")
    return real_step(self)
LLMEngine.step = step
from jaxserve.serve import main
sys.exit(main(sys.argv[1:]))
"""


def _self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS test needs the openssl command line tool")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_tls_then_engine_death_fails_every_client_and_exits_1(tmp_path, lookback_model):
    key, cert = _self_signed(tmp_path)
    port = _free_port()
    log = tmp_path / "server.log"
    args = ["--model", str(lookback_model), *TINY, "--port", str(port), "--compilation-cache-dir", "",
            "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    try:
        wait_healthy(base, 300, procs=[proc], log=log, verify=str(cert))
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        client = httpx.Client(base_url=base, verify=str(cert), timeout=60)
        r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 3}, headers={"X-Request-Id": "tls-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "tls-1"
        _crash_with_clients_waiting(client)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "engine loop crashed: injected engine-loop fault" in text
    assert text.rstrip().splitlines()[-1] == "error: engine loop crashed: injected engine-loop fault"


def _crash_with_clients_waiting(client: httpx.Client) -> None:
    """A stream is running when another request kills the engine loop: both end with errors."""
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"prompt": [5, 6], "max_tokens": 150, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    r = client.post("/v1/completions", json={"prompt": [7, 8], "max_tokens": CRASH_MAX_TOKENS})
    reader.join(30)
    assert not reader.is_alive()  # no hang
    assert r.status_code == 503 and "injected engine-loop fault" in r.json()["error"]["message"]
    assert events[-1] == "[DONE]" and '"error"' in events[-2] and "injected engine-loop fault" in events[-2]
    try:  # the process is stopping: /health is 503 until it has closed its socket
        assert client.get("/health").status_code == 503
    except httpx.TransportError:
        pass
