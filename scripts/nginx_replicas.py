"""Two jaxserve replicas behind a real nginx, configured by docs/scaling.md's own snippet.

Starts two replicas on loopback ports (the second reuses the first's compilation cache), writes an
nginx.conf around the ``upstream``/``server`` blocks of docs/scaling.md (only the addresses
replaced), and checks, printing one JSON report:

1. streams are unbuffered: time to the first streamed token through nginx vs direct (medians);
2. ``least_conn`` spreads concurrent requests over both replicas (each replica's
   ``request_success_total`` delta);
3. failover: one replica is SIGKILLed while streams run on both; the streams in flight on it fail
   (counted), the others finish, and every new request is served by the survivor.

    python scripts/nginx_replicas.py --model /path/to/model --served-model-name m [-- extra serve flags]

Needs nginx (Debian: ``apt-get install nginx``) and loopback ports only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from server_health import wait_healthy

SCALING_MD = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def nginx_conf(prefix: Path, listen: int, upstreams: list[int]) -> str:
    """docs/scaling.md's nginx snippet inside a minimal main config, on loopback addresses."""
    snippet = re.search(r"```nginx\n(.*?)```", SCALING_MD.read_text(), re.S).group(1)
    servers = iter(upstreams)
    snippet = re.sub(r"server \d+\.\d+\.\d+\.\d+:\d+", lambda _: f"server 127.0.0.1:{next(servers)}", snippet)
    snippet = snippet.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {k}_temp_path {prefix}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
            f"events {{ worker_connections 1024; }}\nhttp {{\n    access_log {prefix}/access.log;\n{temp}"
            f"{snippet}}}\n")


class Replica:
    def __init__(self, args: argparse.Namespace, workdir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        argv = [sys.executable, "-m", "jaxserve.serve", "--model", args.model, "--served-model-name",
                args.served_model_name, "--port", str(self.port), "--compilation-cache-dir", str(workdir / "xla"),
                "--disable-log-stats", *args.serve_args]
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        self.proc = subprocess.Popen(argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> None:
        """Until the replica answers ``/health`` 200 (``NotReady`` if it exits or times out)."""
        wait_healthy(self.url, timeout, procs=[self.proc], log=self.log)

    def successes(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return float(re.search(r"^jaxserve:request_success_total\{[^}]*\} (\S+)$", text, re.M).group(1))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def stream(client: httpx.AsyncClient, url: str, body: dict, on_first: Callable[[], None] | None = None) -> dict:
    """One streamed completion: time to its first chunk; finished = ``[DONE]`` after no error event."""
    t0 = time.perf_counter()
    out: dict = {"ttft": None, "finished": False, "error": None, "status": None}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            out["status"] = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: {") and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - t0
                    if on_first is not None:
                        on_first()
                if line.startswith('data: {"error"'):
                    out["error"] = "error event"
                if line == "data: [DONE]":
                    out["finished"] = out["error"] is None and r.status_code == 200
    except httpx.HTTPError as e:
        out["error"] = type(e).__name__
    return out


async def first_token_latency(direct: str, proxy: str, body: dict, rounds: int) -> dict:
    """Median time to the first streamed chunk, direct and through nginx, alternating."""
    times: dict[str, list[float]] = {"direct": [], "nginx": []}
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(rounds):
            for key, url in (("direct", direct), ("nginx", proxy)):
                times[key].append((await stream(client, url, body))["ttft"])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"direct_ms": round(med["direct"] * 1e3, 2), "nginx_ms": round(med["nginx"] * 1e3, 2),
            "difference_ms": round((med["nginx"] - med["direct"]) * 1e3, 2), "rounds": rounds}


async def spread(proxy: str, replicas: list[Replica], body: dict, n: int) -> dict:
    """``n`` concurrent non-streamed requests through nginx; how many each replica served."""
    before = [r.successes() for r in replicas]
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n)) as client:
        rs = await asyncio.gather(*(client.post(f"{proxy}/v1/completions", json=body) for _ in range(n)))
    return {"requests": n, "ok": sum(r.status_code == 200 for r in rs),
            "per_replica": [r.successes() - b for r, b in zip(replicas, before, strict=True)]}


async def failover(
    proxy: str, victim: Replica, survivor: Replica, body: dict, n: int, after: int, kill_after: int
) -> dict:
    """``n`` streams through nginx; SIGKILL ``victim`` once ``kill_after`` have their first token;
    then ``after`` new requests, which only the survivor can serve."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n + after)) as client:
        half = asyncio.Event()
        started = [0]

        def first() -> None:
            started[0] += 1
            if started[0] >= kill_after:
                half.set()

        tasks = [asyncio.create_task(stream(client, proxy, body, first)) for _ in range(n)]
        await asyncio.wait_for(half.wait(), 120)
        victim.proc.kill()
        victim.proc.wait()
        results = await asyncio.gather(*tasks)
        before = survivor.successes()
        new = await asyncio.gather(*(client.post(f"{proxy}/v1/completions", json={**body, "max_tokens": 4})
                                     for _ in range(after)))
        served = survivor.successes() - before
    failed = [r for r in results if not r["finished"]]
    return {"in_flight": n, "finished": n - len(failed), "failed": len(failed),
            "failure_kinds": sorted({r["error"] or f"status {r['status']}" for r in failed}),
            "new_requests": after, "new_ok": sum(r.status_code == 200 for r in new), "new_served_by_survivor": served}


def start_nginx(nginx: str, workdir: Path, listen: int, ports: list[int]) -> subprocess.Popen:
    prefix = workdir / "nginx"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(nginx_conf(prefix, listen, ports))
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=(prefix / "stderr.log").open("w"))
    wait_healthy(f"http://127.0.0.1:{listen}", 20, procs=[proc], log=prefix / "stderr.log", interval=0.1)
    return proc


def run(args: argparse.Namespace, workdir: Path) -> dict:
    nginx = find_nginx()
    if nginx is None:
        raise SystemExit("nginx not found (Debian: apt-get install nginx)")
    a = Replica(args, workdir, "replica_a")
    a.wait_ready(args.ready_timeout)
    b = Replica(args, workdir, "replica_b")  # after A: it reads A's compilation cache
    proxy = None
    try:
        b.wait_ready(args.ready_timeout)
        listen = free_port()
        proxy = start_nginx(nginx, workdir, listen, [a.port, b.port])
        url = f"http://127.0.0.1:{listen}"
        short = {"model": args.served_model_name, "prompt": args.prompt, "max_tokens": 8, "temperature": 0}
        long = {**short, "max_tokens": args.long_tokens, "ignore_eos": True}
        return {
            "nginx": subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip(),
            "first_token": asyncio.run(first_token_latency(a.url, url, short, args.rounds)),
            "least_conn": asyncio.run(spread(url, [a, b], long, args.concurrency)),
            "failover": asyncio.run(failover(url, a, b, long, args.concurrency, args.after, args.kill_after)),
        }
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=10)
        for r in (a, b):
            r.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", default="model")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--after", type=int, default=16, help="new requests after the kill")
    p.add_argument("--long-tokens", type=int, default=200)
    p.add_argument("--kill-after", type=int, default=8, help="kill a replica once this many streams started")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ready-timeout", type=float, default=900)
    p.add_argument("--workdir", type=Path, help="keep logs and configs here (default: a temporary directory)")
    p.add_argument("serve_args", nargs="*", help="after --: extra flags for both replicas")
    args = p.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as d:
            report = run(args, Path(d))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
