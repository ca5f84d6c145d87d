"""End to end on whatever device jax sees: start the server, wait for ``/health``, send one chat
request and one streamed request with the ``openai`` client, read the KV-cache size the server
chose from ``--gpu-memory-utilization``; then start it with a budget too small for one sequence
and report how the process ends. One JSON line per phase.

  python scripts/gpu_serve_check.py --model DIR [--load-format dummy] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def start(args: argparse.Namespace, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxserve.serve", "--model", args.model, "--port", str(port),
           "--compilation-cache-dir", "", *args.server_args.split(), *extra]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> tuple[str, float]:
    """('ready' | 'exited' | 'error logged, still running' | 'timeout', seconds waited).

    A traceback in the log ends the wait 10 s later if the process is still up (a server that
    keeps running after its engine failed would otherwise use the whole timeout).
    """
    t0 = time.perf_counter()
    failed_at = None
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            return "exited", time.perf_counter() - t0
        if health(port) == 200:
            return "ready", time.perf_counter() - t0
        if failed_at is None and "Traceback" in log.read_text(errors="replace"):
            failed_at = time.perf_counter()
        if failed_at is not None and time.perf_counter() - failed_at > 10:
            return "error logged, still running", time.perf_counter() - t0
        time.sleep(0.5)
    return "timeout", time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def kv_lines(log: Path) -> list[str]:
    text = log.read_text(errors="replace")
    return [ln.split(": ", 1)[-1] for ln in text.splitlines() if re.search(r"KV budget|KV cache:|compiled \d+", ln)]


def chat(port: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    model = client.models.list().data[0].id
    t = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                       max_tokens=16, temperature=0)
    chat_s = time.perf_counter() - t
    t = time.perf_counter()
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=16, temperature=0, stream=True))
    return {"model": model, "completion_tokens": r.usage.completion_tokens, "finish_reason": r.choices[0].finish_reason,
            "chat_s": round(chat_s, 3), "stream_chunks": len(chunks), "stream_s": round(time.perf_counter() - t, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--server-args", default="", help="extra server flags, one string")
    p.add_argument("--too-small", default="--gpu-memory-utilization 0.01 --max-model-len 32768",
                   help="flags that leave too little memory for one sequence")
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        port = free_port()
        proc = start(args, port, log, [])
        state, waited = wait_ready(proc, port, args.timeout, log)
        row: dict = {"serve_check": "start", "state": state, "ready_s": round(waited, 1), "kv": kv_lines(log)}
        if state == "ready":
            try:
                row.update(chat(port))
            except Exception as e:  # noqa: BLE001 - reported, the next phase still runs
                row["error"] = f"{type(e).__name__}: {e}"
                ok = False
        else:
            row["log_tail"] = log.read_text(errors="replace").splitlines()[-5:]
            ok = False
        row["exit_code"] = stop(proc)
        print(json.dumps(row), flush=True)

        log2 = Path(tmp) / "small.log"
        port = free_port()
        proc = start(args, port, log2, args.too_small.split())
        state, waited = wait_ready(proc, port, 60, log2)
        lines = [ln for ln in log2.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() or "KV cache holds" in ln]
        print(json.dumps({"serve_check": "too_small", "flags": args.too_small, "state": state,
                          "seconds": round(waited, 1), "exit_code": stop(proc),
                          "error_line": (errors or lines or [""])[-1][-300:]}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
