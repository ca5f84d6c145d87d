"""CI: the README's serve command on a clean slate.

A fresh clone of the commit under test, an empty HOME (no caches of any kind, only pip's download
cache is shared to keep it quick), no torch: ``make serve`` must install, reach ``/health`` 200,
answer one chat request and one streaming chat request through the ``openai`` client, and stop
on SIGTERM. Any failed step fails CI; timings are printed.

    .venv/bin/python .ci/serve_check.py        # run with a Python that has the openai client
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 900  # install + load + compile on a 2-core CI machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_clone(dest: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True, text=True)
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "checkout", "-q", head.stdout.strip()], cwd=dest, check=True)


def _clean_env(home: Path) -> dict[str, str]:
    pip_cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "PYENV_ROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(HOME=str(home), JAX_PLATFORMS="cpu")
    if pip_cache.returncode == 0 and pip_cache.stdout.strip():
        env["PIP_CACHE_DIR"] = pip_cache.stdout.strip()  # downloads only; nothing of jaxserve's
    return env


def _script(name: str) -> types.ModuleType:
    """``scripts/<name>.py`` of this checkout (scripts/ is not a package; CI runs this file directly)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


server_health = _script("server_health")


def _chat(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16)
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens > 0, r
    chunks = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=16, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed, "the stream carried no text"
    print(f"chat: {text!r}\nstream: {streamed!r}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="jaxserve-serve-check-") as tmp:
        clone, home = Path(tmp) / "clone", Path(tmp) / "home"
        home.mkdir()
        _fresh_clone(clone)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "serve.log"
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["make", "serve", f"SERVE_ARGS=--port {port}"], cwd=clone, env=_clean_env(home),
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            try:
                server_health.wait_healthy(url, READY_TIMEOUT_S, procs=[proc], log=log, interval=1)
            except server_health.NotReady as e:
                raise SystemExit(f"FAIL: make serve: {e}") from None
            ready_s = time.monotonic() - t0
            print("".join(line for line in log.read_text().splitlines(keepends=True)
                          if "start-up" in line or "ready" in line or "compiled" in line), end="")
            _chat(url)
            no_torch = subprocess.run([str(clone / ".venv/bin/python"), "-c", "import torch"], capture_output=True)
            assert no_torch.returncode != 0, "the serve install must not contain torch"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise SystemExit("FAIL: the server did not stop within 60 s of SIGTERM") from None
        print(f"serve check passed: make serve -> /health 200 in {ready_s:.0f} s (fresh venv, empty HOME)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
