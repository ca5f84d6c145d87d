"""Over HTTP: a request that fails inside the engine gets a 500 (or an error event, then [DONE])
while concurrent requests finish; tokenizing a 100k-character prompt never blocks the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from jaxserve.engine.output_processor import RequestOutput
from tests.server.fake_app import fake_serving, tiny_tokenizer
from tests.server.test_engine_states import FakeLLM

BAD_MAX_TOKENS = 7  # the stand-in engine fails requests that ask for this many tokens, after one token


class FaultyLLM(FakeLLM):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad: set[str] = set()

    def enqueue(self, rid, admitted):
        super().enqueue(rid, admitted)
        if admitted.max_tokens == BAD_MAX_TOKENS:
            self.bad.add(rid)

    def step(self):
        outs = super().step()
        for i, out in enumerate(outs):
            if out.request_id in self.bad and out.num_output_tokens and self.pending.pop(out.request_id, None):
                outs[i] = RequestOutput(out.request_id, [], "", True, "error", None, 1, 1,
                                        error="RuntimeError: injected fault")
        return outs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _body(max_tokens: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


def test_a_failing_request_fails_alone(tok):
    hold = threading.Event()
    llm = FaultyLLM(hold=hold)
    s = fake_serving(tok, llm)
    client = TestClient(s.app)
    bodies = [_body(5, False), _body(BAD_MAX_TOKENS, False), _body(4, True), _body(BAD_MAX_TOKENS, True), _body(3, False)]
    results: list = [None] * len(bodies)

    def send(i: int) -> None:
        results[i] = client.post("/v1/chat/completions", json=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(llm.added) < len(bodies) and time.monotonic() < deadline:  # all running together
            time.sleep(0.01)
        hold.set()
        for t in threads:
            t.join(20)
        good, bad, stream_good, stream_bad, good2 = results
        assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "ddddd"
        assert good2.status_code == 200 and good2.json()["choices"][0]["message"]["content"] == "ddd"
        assert bad.status_code == 500
        err = bad.json()["error"]
        assert err["type"] == "InternalServerError" and "injected fault" in err["message"] and err["code"] == 500
        events = [line[6:] for line in stream_bad.text.splitlines() if line.startswith("data: ")]
        assert stream_bad.status_code == 200 and '"error"' in events[-2] and "injected fault" in events[-2]
        assert events[-1] == "[DONE]"
        events = [line[6:] for line in stream_good.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
        assert client.get("/health").status_code == 200
    finally:
        s.shutdown()


class SlowTokenizer:
    """The real tokenizer, with ``encode`` slowed to 0.5 s: blocking the loop would show in /health."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)

    def encode(self, *args, **kwargs):
        time.sleep(0.5)
        return self._tok.encode(*args, **kwargs)


async def _health_latencies_during(app, body: dict) -> tuple[list[float], httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        big = asyncio.ensure_future(client.post("/v1/completions", json=body, timeout=60))
        await asyncio.sleep(0.02)
        latencies = []
        while not big.done():
            t0 = time.perf_counter()
            await client.get("/health")
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)
        return latencies, await big


@pytest.mark.parametrize("slow", [False, True], ids=["real-tokenizer", "tokenizer-slowed-to-0.5s"])
def test_tokenizing_a_100k_character_prompt_does_not_block_the_loop(tok, slow):
    s = fake_serving(SlowTokenizer(tok) if slow else tok)
    try:
        prompt = "The quick brown fox jumps over the lazy dog. " * 2300  # ~100k characters
        latencies, r = asyncio.run(_health_latencies_during(s.app, {"prompt": prompt[:100_000], "max_tokens": 1}))
    finally:
        s.shutdown()
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # tokenized, then too long
    if slow:
        assert len(latencies) >= 5  # /health answered many times while encode slept
    assert max(latencies, default=0.0) < 0.05, latencies
