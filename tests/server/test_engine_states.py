"""/health and request handling while the engine loads, after a failed start-up, after a crash,
and when the waiting queue is full (in-process app with a stand-in engine)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
from fastapi.testclient import TestClient

from jaxserve.config import ServeConfig
from jaxserve.engine.async_engine import AsyncEngine, EngineState
from jaxserve.engine.interface import EngineInfo, EngineMetrics
from jaxserve.engine.output_processor import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.app import build_app


class FakeTokenizer:
    chat_template = "x"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 50 for c in text] or [1]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, **kw):
        return "".join(m["content"] for m in messages)

    def convert_ids_to_tokens(self, i):
        return chr(97 + i % 26)


class FakeLLM:
    """Duck-typed LLMEngine: one token per step; optionally crashes on the first step.

    With ``hold``, steps wait for it to be set, and until then every request counts as waiting.
    """

    loras = None  # no LoRA adapters (AsyncEngine publishes LLMEngine.loras)

    def __init__(self, crash: bool = False, hold: threading.Event | None = None) -> None:
        self.info = EngineInfo(FakeTokenizer(), max_model_len=64, vocab_size=50, kv_capacity_tokens=1024,
                               default_sampling={})
        self.crash = crash
        self.hold = hold
        self.pending: dict[str, int] = {}
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.stepped: set[str] = set()  # requests some step produced a token for

    def metrics(self) -> EngineMetrics:
        waiting = len(self.pending) if self.hold is not None and not self.hold.is_set() else 0
        return EngineMetrics(len(self.pending) - waiting, waiting, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0)

    def enqueue(self, rid, admitted):
        self.added.append(rid)
        self.pending[rid] = admitted.max_tokens

    def abort(self, rid):
        self.aborted.append(rid)
        return self.pending.pop(rid, None) is not None

    def has_unfinished(self):
        return bool(self.pending)

    compiles_pending = 0  # no background compiles
    admitting = False  # no step with prompt chunks is running on a device (AsyncEngine._gather_burst)

    def idle_work(self):
        return False

    def close(self):
        pass

    def step(self):
        if self.crash:
            raise RuntimeError("device fell over")
        if self.hold is not None:
            self.hold.wait(10)
        outs = []
        for rid in list(self.pending):
            self.stepped.add(rid)
            self.pending[rid] -= 1
            done = self.pending[rid] == 0
            if done:
                del self.pending[rid]
            outs.append(RequestOutput(rid, [3], "d", done, "length" if done else None, None, 1, 1))
        return outs


CFG = ServeConfig(model="stand-in")


def _client(engine: AsyncEngine) -> TestClient:
    return TestClient(build_app(CFG, engine))


def test_health_503_while_loading_then_200():
    gate = threading.Event()

    def factory():
        gate.wait(10)
        return FakeLLM()

    engine = AsyncEngine(factory)
    engine.start()
    client = _client(engine)
    r = client.get("/health")
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    assert r.headers["Retry-After"] == "5" and "loading" in r.json()["error"]["message"]
    gate.set()
    engine.wait_ready(5)
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "dd"
    engine.shutdown()


def test_health_503_after_failed_startup():
    def factory():
        raise FileNotFoundError("weights gone")

    engine = AsyncEngine(factory)
    engine.start()
    with pytest.raises(Exception):
        engine.wait_ready(5)
    assert engine.state is EngineState.FAILED
    r = _client(engine).get("/health")
    assert r.status_code == 503 and "weights gone" in r.json()["error"]["message"]
    r = _client(engine).post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and "Retry-After" not in r.headers
    assert r.json()["error"]["message"] == "engine start-up failed: FileNotFoundError: weights gone"


def test_crashed_loop_fails_requests_and_health():
    engine = AsyncEngine(lambda: FakeLLM(crash=True))
    engine.start()
    engine.wait_ready(5)
    client = _client(engine)
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and "device fell over" in r.json()["error"]["message"]
    assert engine.state is EngineState.DEAD
    assert client.get("/health").status_code == 503
    # streaming requests started before the crash get an error event, then [DONE]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
    assert r.status_code == 503


def test_error_after_stream_started_is_an_event_then_done():
    hold = threading.Event()
    llm = FakeLLM(hold=hold)
    engine = AsyncEngine(lambda: llm)
    engine.start()
    engine.wait_ready(5)
    client = _client(engine)

    def crash_soon():
        time.sleep(0.3)
        llm.crash = True
        hold.set()

    threading.Thread(target=crash_soon, daemon=True).start()
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True,
                                                 "max_tokens": 5})
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"


def test_queue_rule_counts_every_choice():
    """The one rule: a request's n choices may wait only if waiting + n <= max_queue_size."""
    hold = threading.Event()
    llm = FakeLLM(hold=hold)
    engine = AsyncEngine(lambda: llm, max_queue_size=2)
    engine.start()
    engine.wait_ready(5)
    client = _client(engine)
    r = client.post("/v1/completions", json={"prompt": "x", "n": 3, "max_tokens": 1})
    assert r.status_code == 503 and "0 requests are already waiting (limit 2)" in r.json()["error"]["message"]
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(
        r=client.post("/v1/completions", json={"prompt": "x", "n": 2, "max_tokens": 1})))
    worker.start()
    deadline = time.monotonic() + 5
    while len(llm.pending) < 2 and time.monotonic() < deadline:  # both choices reached the engine
        time.sleep(0.01)
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and "2 requests are already waiting (limit 2)" in r.json()["error"]["message"]
    hold.set()
    worker.join(10)
    assert first["r"].status_code == 200 and [c["text"] for c in first["r"].json()["choices"]] == ["d", "d"]
    r = client.post("/v1/completions", json={"prompt": "x", "n": 2, "max_tokens": 1})
    assert r.status_code == 200  # the queue drained
    engine.shutdown()


def test_disconnect_before_admission_is_never_computed():
    """A client that leaves while its request waits to reach the engine: no step ever runs it."""
    hold = threading.Event()
    llm = FakeLLM(hold=hold)
    engine = AsyncEngine(lambda: llm)
    engine.start()
    engine.wait_ready(5)

    async def run() -> list:
        first = engine.submit("a", [[1]], [SamplingParams(max_tokens=2)])
        await asyncio.to_thread(_wait_for, lambda: llm.added == ["a-0"])  # "a" runs; its step is held
        later = engine.submit("b", [[1]], [SamplingParams(max_tokens=2)])
        waiting = asyncio.ensure_future(anext(later.outputs()))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client goes away before the engine took "b"
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        later.close()
        hold.set()
        return [out async for _, out in first.outputs()]

    outs = asyncio.run(run())
    assert [o.request_id for o in outs] == ["a-0", "a-0"] and outs[-1].finished
    _wait_for(lambda: "b-0" in llm.aborted or "b-0" not in llm.added)
    _wait_for(lambda: not llm.has_unfinished())
    assert "b-0" not in llm.stepped  # aborted (or dropped) before any step computed it
    engine.shutdown()


def _wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
