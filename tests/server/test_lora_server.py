"""LoRA adapters over HTTP (no torch): a YAML ``models:`` entry with ``lora-modules``, routing by
the request's ``model``, ``/v1/models`` parents, runtime load/unload behind the API key (409 while
requests use the adapter), ``/metrics`` by adapter, streaming and structured outputs under an adapter. The lookback model's shift adapters make
every answer hand-checkable (``tests/lora_helpers.shift_continue``)."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import pytest
import yaml

from tests.helpers import lookback_continue
from tests.lora_helpers import shift_continue, write_shift_adapter
from tests.server.conftest import API_KEY, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = [5, 77, 200, 31, 9]


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory, lookback_model):
    root = tmp_path_factory.mktemp("lora-server")
    for s in (1, 5, 9):
        write_shift_adapter(root / f"s{s}", s)
    cfg = root / "lora.yaml"
    cfg.write_text(yaml.safe_dump({"api-key": [API_KEY], "models": [{
        "name": "base", "model": str(lookback_model), "max-num-seqs": 4, "max-num-batched-tokens": 16,
        "block-size": 4, "max-model-len": 128, "kv-cache-memory-gib": 0.0625, "dtype": "float32",
        "enable-lora": True, "max-loras": 2, "enable-lora-runtime-updates": True,
        "lora-modules": [f"s1={root}/s1", {"name": "s5", "path": str(root / "s5"), "base_model_name": "base"}],
    }]}))
    server = start_server(tmp_path_factory, "lora", ["--config", str(cfg)])
    yield server, root
    server.stop()


def _complete(base_url: str, model: str, n: int = 8) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                            "return_tokens_as_token_ids": True, "logprobs": 0})


def _tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def test_adapters_are_routed_by_model_name(lora_server):
    server, root = lora_server
    url = server.base_url
    cards = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("s1", "base"), ("s5", "base")]
    assert cards[1]["root"] == str(root / "s1")
    assert _tokens(_complete(url, "base")) == lookback_continue(PROMPT, 8)
    assert _tokens(_complete(url, "s1")) == shift_continue(PROMPT, 8, 1)
    r = _complete(url, "s5")
    assert _tokens(r) == shift_continue(PROMPT, 8, 5) and r.json()["model"] == "s5"
    r = _complete(url, "s9")
    assert r.status_code == 404 and "served models: base, s1, s5" in r.json()["error"]["message"]
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert 'jaxserve:lora_requests_running{lora_name="s1",model_name="base"} 0.0' in metrics
    tokenized = httpx.post(f"{url}/tokenize", headers=AUTH, json={"model": "s1", "prompt": "hello"})
    assert tokenized.status_code == 200 and tokenized.json()["tokens"]  # the base model's tokenizer


def test_mixed_concurrent_requests_get_their_own_tokens(lora_server):
    """Base, s1 and s5 requests at once (two slots, so s1 and s5 share steps with the base rows):
    every answer is its adapter's hand-computed continuation."""
    server, _ = lora_server
    prompts = [[5, 77, 200, 31, 9], [100, 3], [44, 45, 46, 47, 48, 49, 50, 51, 52]]
    jobs = [(m, p) for m in ("base", "s1", "s5") for p in prompts]

    def run(job):
        r = httpx.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=60, json={
            "model": job[0], "prompt": job[1], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_tokens_as_token_ids": True, "logprobs": 0})
        return _tokens(r)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    shifts = {"base": 0, "s1": 1, "s5": 5}
    assert got == [shift_continue(p, 12, shifts[m]) for m, p in jobs]
    assert len({tuple(g) for g in got}) == len(got), "each adapter must change the tokens"


def test_streaming_with_an_adapter_equals_non_streaming(lora_server):
    server, _ = lora_server
    url = server.base_url
    whole = _tokens(_complete(url, "s5", 10))
    streamed, models = [], set()
    body = {"model": "s5", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "return_tokens_as_token_ids": True, "logprobs": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                models.add(chunk["model"])
                for c in chunk["choices"]:
                    streamed += [int(t.split(":")[1]) for t in (c.get("logprobs") or {}).get("tokens", [])]
    assert streamed == whole == shift_continue(PROMPT, 10, 5) and models == {"s5"}
    assert whole != lookback_continue(PROMPT, 10)  # the adapter changes the tokens


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "level": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["name", "level"], "additionalProperties": False}


def test_structured_output_with_an_adapter(lora_server):
    """json_schema under an adapter: valid JSON, the same answer streamed or not, and not the base
    model's answer (the adapter's weights steer the choices the grammar leaves free)."""
    server, _ = lora_server
    url = f"{server.base_url}/v1/chat/completions"
    fmt = {"type": "json_schema", "json_schema": {"name": "status", "schema": SCHEMA, "strict": True}}

    def run(model: str, stream: bool = False) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "status"}], "max_tokens": 40,
                "temperature": 0, "response_format": fmt, "stream": stream}
        if not stream:
            r = httpx.post(url, headers=AUTH, json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "stop"
            return r.json()["choices"][0]["message"]["content"]
        text = ""
        with httpx.stream("POST", url, headers=AUTH, json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
        return text

    answers = {m: run(m) for m in ("base", "s1", "s5")}
    for text in answers.values():
        value = json.loads(text)
        assert set(value) == {"name", "level"} and len(value["name"]) <= 8 and value["level"] in range(10)
    assert run("s5", stream=True) == answers["s5"]
    assert len(set(answers.values())) == 3, answers


def test_runtime_load_and_unload(lora_server):
    server, root = lora_server
    url = server.base_url
    body = {"lora_name": "s9", "lora_path": str(root / "s9")}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 401  # the API key guards it
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert _tokens(_complete(url, "s9")) == shift_continue(PROMPT, 8, 9)
    again = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=AUTH)
    assert again.status_code == 400 and "already in use" in again.json()["error"]["message"]
    bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root)}, headers=AUTH)
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]

    # Unloading while requests of the adapter are queued or running is refused with 409 (16 requests
    # of 100 tokens, 4 at a time: hundreds of steps); once they end it succeeds.
    results: list[list[int]] = []
    clients = [threading.Thread(target=lambda: results.append(_tokens(_complete(url, "s9", 100)))) for _ in range(16)]
    for c in clients:
        c.start()
    try:
        while 'jaxserve:lora_requests_running{lora_name="s9",model_name="base"} 0.0' in httpx.get(
                f"{url}/metrics", headers=AUTH).text:
            pass
        busy = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "s9"}, headers=AUTH)
        assert busy.status_code == 409 and "in flight" in busy.json()["error"]["message"]
    finally:
        for c in clients:
            c.join()
    assert results == [shift_continue(PROMPT, 100, 9)] * 16
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "s9"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert _complete(url, "s9").status_code == 404
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "s9"}, headers=AUTH)
    assert gone.status_code == 404
