"""A reader that stops reading is dropped (its request aborted, its KV blocks freed), and SIGTERM
drains: running streams finish, new requests get 503, what outlasts --shutdown-timeout is
aborted with an error event, the process exits 0. One real lookback server serves the module;
the SIGTERM test ends it, so it comes last."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import SMALL, ServerProcess, start_server

LONG = 1000  # tokens: the longest the model allows (--max-model-len 1024)


@pytest.fixture(scope="module")
def server(tmp_path_factory, lookback_model) -> Iterator[ServerProcess]:
    s = start_server(tmp_path_factory, "shutdown", [
        "--model", str(lookback_model), "--served-model-name", "lookback", *SMALL, "--max-model-len", "1024",
        "--max-undelivered-chunks", "500", "--shutdown-timeout", "3",
    ])
    yield s
    s.stop()


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    return float(re.search(rf"^jaxserve:{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def _body(max_tokens: int) -> dict:
    return {"model": "lookback", "prompt": [5, 6], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}


def _dropping_body() -> dict:
    """24,000 chunks of 20 logprobs each (~16 MB): far more than the socket buffers hold (Linux: 4 MiB)."""
    return {**_body(LONG), "n": 24, "logprobs": 20}


def test_slow_reader_is_dropped_and_its_blocks_freed(server):
    aborted_before = _metric(server.base_url, "request_aborted_total")
    generated_before = _metric(server.base_url, "generation_tokens_total")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill
    sock.connect(("127.0.0.1", server.port))
    body = json.dumps(_dropping_body()).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # then the reader stops reading
    deadline = time.monotonic() + 30
    while _metric(server.base_url, "request_aborted_total") == aborted_before and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert _metric(server.base_url, "request_aborted_total") >= aborted_before + 1  # its unfinished choices
        assert _metric(server.base_url, "num_requests_running") == 0
        assert _metric(server.base_url, "kv_cache_used_blocks") == 0
        assert _metric(server.base_url, "generation_tokens_total") - generated_before < 24 * LONG  # cut short
        assert "fell 500 outputs behind; dropped and aborted" in server.log.read_text()
    finally:
        sock.close()


def test_a_reader_that_keeps_up_is_never_dropped(server):
    """The twin of the test above: the same 24,000-output stream, read as it comes, is delivered whole."""
    aborted_before = _metric(server.base_url, "request_aborted_total")
    drops_before = server.log.read_text().count("dropped and aborted")
    finished: dict[int, str] = {}
    tokens = 0
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=_dropping_body(), timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            tokens += len(choice["logprobs"]["tokens"])
            if choice["finish_reason"] is not None:
                finished[choice["index"]] = choice["finish_reason"]
    assert finished == {i: "length" for i in range(24)} and tokens == 24 * LONG
    assert _metric(server.base_url, "request_aborted_total") == aborted_before
    assert server.log.read_text().count("dropped and aborted") == drops_before


# Two requests (one streamed, one not) of 64 choices x 1000 tokens behind 4 slots: 32,000 steps. Few
# requests, so all are in the engine at once soon after they are sent.
LONG_JOBS, CHOICES = 2, 64
SHORT = 600  # tokens of the stream in flight at SIGTERM: it shares 4 slots with the long ones, so ~1 s


def _request(base_url: str, max_tokens: int, n: int, stream: bool, out: dict, started: threading.Event) -> None:
    events = []
    body = {**_body(max_tokens), "n": n, "stream": stream}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        out["status"] = r.status_code
        if not stream:
            out["body"] = json.loads(r.read())
            return
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    out["events"] = events


def _outcome(out: dict) -> str:
    """"done" (every choice's LONG tokens, finish_reason length) or "aborted" (the shutdown's error),
    else a failure."""
    if "body" in out:
        body = out["body"]
        if out["status"] == 200 and body["usage"]["completion_tokens"] == CHOICES * LONG:
            return "done"
        error = body["error"]
        assert out["status"] == 503 and error["message"] == SHUTDOWN_ERROR and error["code"] == 503, body
        return "aborted"
    events = out["events"]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    if "error" in last:
        assert last["error"]["message"] == SHUTDOWN_ERROR and last["error"]["code"] == 503, last
        return "aborted"
    finished = {c["index"]: c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]
                if c["finish_reason"] is not None}
    assert finished == {i: "length" for i in range(CHOICES)}, finished
    return "done"


def _in_engine(base_url: str) -> float:
    """Sequences (choices) the engine has seen: finished, running or waiting."""
    return sum(_metric(base_url, m) for m in ("request_success_total", "num_requests_running", "num_requests_waiting"))


SHUTDOWN_ERROR = "the server is shutting down: the request was aborted after 3s"


def test_sigterm_drains_new_requests_503_then_aborts_and_exits_0(server):
    """A stream in flight at SIGTERM (started first) finishes; 2 long requests of 64 choices each behind
    4 slots (128,000 tokens: far more than --shutdown-timeout 3 allows) end with the shutdown's error;
    exit 0. The SIGTERM waits until every sequence is in the engine."""
    short: dict = {}
    started = threading.Event()
    long = [{} for _ in range(LONG_JOBS)]
    threads = [threading.Thread(target=_request, args=(server.base_url, SHORT, 1, True, short, started))]
    threads += [threading.Thread(target=_request, args=(server.base_url, LONG, CHOICES, i % 2 == 0, out,
                                                        threading.Event()))
                for i, out in enumerate(long)]
    finished_before = _metric(server.base_url, "request_success_total")
    generated_before = _metric(server.base_url, "generation_tokens_total")
    threads[0].start()  # first, so that it runs, not queued behind the long ones (FIFO)
    assert started.wait(30)
    for t in threads[1:]:
        t.start()
    sequences = 1 + LONG_JOBS * CHOICES
    deadline = time.monotonic() + 30
    while (seen := _in_engine(server.base_url) - finished_before) < sequences and time.monotonic() < deadline:
        time.sleep(0.02)  # every request reached the engine (SIGTERM would refuse those still connecting)
    assert seen == sequences, f"after 30 s the engine has seen {seen} of the {sequences} sequences"
    generated = _metric(server.base_url, "generation_tokens_total") - generated_before
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    health = httpx.get(f"{server.base_url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["error"]["message"] == "draining"
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": [5], "max_tokens": 2}, timeout=5)
    assert r.status_code == 503
    assert r.json()["error"] == {"message": "the server is shutting down", "type": "ServiceUnavailableError",
                                 "param": None, "code": 503}
    for t in threads:
        t.join(30)
    events = short["events"]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])  # it streamed text
    outcomes = [_outcome(out) for out in long]
    assert outcomes == ["aborted"] * LONG_JOBS, f"{outcomes}; {generated:.0f} of their tokens before SIGTERM"
    assert server.proc.wait(timeout=30) == 0
    assert 3 <= time.monotonic() - sent < 20
