"""Seconds from launching ``python -m jaxserve.serve`` to ``/health`` 200, cold and warm, for variants
run alternately (A B A B ...) so that a shared machine's load hits them alike.

  python scripts/bench_ready.py --config configs/smollm2.yaml --repeat 3 \
      --variant background= --variant all=--no-background-compile [--cold] [--warm]

A variant is ``NAME=EXTRA SERVE FLAGS``. Cold: a fresh, empty compilation cache and ``HOME`` per
run. Warm: one cache per variant, filled by a first (cold) start. Each run prints one JSON
line: ready seconds, the engine's own split (load / compile / warm-up, from its log) and the time
from launch to the engine's first log line (interpreter, imports, configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server_health import wait_healthy

READY_TIMEOUT_S = 3600  # a cold start on a loaded 2-core machine takes minutes
_READY = re.compile(r"engine ready after ([\d.]+)s \(load ([\d.]+)s, compile ([\d.]+)s, warm-up ([\d.]+)s\)")


def start_to_ready(config: str, extra: list[str], cache: str, home: str, port: int) -> dict:
    """Launch one server, poll ``/health`` every 50 ms, stop it once ready; its timings."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - read after exit
    cmd = [sys.executable, "-m", "jaxserve.serve", "--config", config, "--port", str(port),
           "--compilation-cache-dir", cache, "--disable-log-stats", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HOME": home})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", READY_TIMEOUT_S, procs=[proc], log=Path(log.name), interval=0.05)
        ready = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    text = open(log.name).read()
    os.unlink(log.name)
    m = _READY.search(text)
    engine = dict(zip(("engine", "load", "compile", "warm_up"), map(float, m.groups()))) if m else {}
    return {"ready_s": round(ready, 2), **engine, "before_engine_s": round(ready - engine.get("engine", 0), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/smollm2.yaml")
    p.add_argument("--variant", action="append", default=[], help="NAME=EXTRA FLAGS (repeatable)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="cold runs (empty cache and HOME each time)")
    p.add_argument("--warm", action="store_true", help="warm runs (a cache per variant, filled first)")
    p.add_argument("--port", type=int, default=8791)
    args = p.parse_args(argv)
    variants = [(v.partition("=")[0], shlex.split(v.partition("=")[2])) for v in args.variant or ["default="]]
    root = tempfile.mkdtemp(prefix="bench_ready_")
    warm = {name: os.path.join(root, f"warm-{name}") for name, _ in variants}
    results: dict[tuple[str, str], list[float]] = {}
    if args.warm:  # the filling start is itself a cold run
        for name, extra in variants:
            r = start_to_ready(args.config, extra, warm[name], tempfile.mkdtemp(dir=root), args.port)
            r.update(variant=name, kind="cold", run="fill", load_average=os.getloadavg()[0])
            print(json.dumps(r), flush=True)
            results.setdefault(("cold", name), []).append(r["ready_s"])
    for i in range(args.repeat):
        for kind in [k for k, on in (("cold", args.cold), ("warm", args.warm)) if on]:
            for name, extra in variants:
                cache = tempfile.mkdtemp(dir=root) if kind == "cold" else warm[name]
                r = start_to_ready(args.config, extra, cache, tempfile.mkdtemp(dir=root), args.port)
                r.update(variant=name, kind=kind, run=i, load_average=os.getloadavg()[0])
                print(json.dumps(r), flush=True)
                results.setdefault((kind, name), []).append(r["ready_s"])
    for (kind, name), xs in results.items():
        print(f"{kind:4} {name:12} ready min {min(xs):6.1f} s  median {statistics.median(xs):6.1f} s  ({len(xs)} runs)")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
