"""Request ids, what the logs may hold, API keys on every route, sandboxed chat templates
(the real app over stand-in engines: ``tests/server/fake_app.py``)."""

from __future__ import annotations

import logging
import re

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from jaxserve.config import ServeConfig
from jaxserve.config_loading import load_config
from jaxserve.server.request_id import RequestIdFilter
from tests.server.fake_app import fake_serving, tiny_tokenizer

MARKER = "zebra-quokka"  # text that must not reach a log line unless --enable-log-requests


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def serving(tok):
    s = fake_serving(tok)
    yield s
    s.shutdown()


def _chat(client: TestClient, content: str = "hi", headers: dict | None = None, **fields):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def test_request_id_taken_from_the_request_or_generated(serving):
    client = TestClient(serving.app)
    r = _chat(client, headers={"X-Request-Id": "job-42.a"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "job-42.a"
    assert r.json()["id"] == "chatcmpl-job-42.a"
    assert serving.llm.added[-1] == "chatcmpl-job-42.a-0"  # the engine's request names it too
    r = _chat(client)
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and r.json()["id"] == f"chatcmpl-{rid}"
    for bad in ("has space", "x" * 129, "ünï"):  # not a plain token: replaced, never echoed
        r = _chat(client, headers={"X-Request-Id": bad.encode()})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    r = client.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "e1", "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.headers["x-request-id"] == "e1"  # errors from middleware carry it too
    assert client.get("/health", headers={"X-Request-Id": "h"}).headers["x-request-id"] == "h"


def test_a_request_id_in_use_is_refused(serving):
    import threading

    hold = serving.llm.hold = threading.Event()
    client = TestClient(serving.app)
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=_chat(client, headers={"X-Request-Id": "dup"})))
    t.start()
    while "chatcmpl-dup-0" not in serving.llm.added:
        pass
    r = _chat(client, headers={"X-Request-Id": "dup"})
    hold.set()
    t.join(10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"
    assert first["r"].status_code == 200


def _log_lines(tok, caplog, log_requests: bool) -> list[logging.LogRecord]:
    s = fake_serving(tok, log_requests=log_requests)
    caplog.handler.addFilter(RequestIdFilter())
    try:
        client = TestClient(s.app)
        with caplog.at_level(logging.DEBUG):
            _chat(client, MARKER, headers={"X-Request-Id": "rid-1"}, stop=[MARKER])
            client.post("/v1/completions", json={"prompt": MARKER, "max_tokens": 2, "stop": MARKER},
                        headers={"X-Request-Id": "rid-2"})
            client.post("/v1/completions", json={"prompt": MARKER, "max_tokens": 10**6}, headers={"X-Request-Id": "rid-3"})
            client.post("/v1/embeddings", json={"input": MARKER}, headers={"X-Request-Id": "rid-4"})
    finally:
        s.shutdown()
    return list(caplog.records)


def test_no_prompt_or_output_text_in_logs_unless_enabled(tok, caplog):
    records = _log_lines(tok, caplog, log_requests=False)
    assert records  # some lines were captured (the access of the engine, at least)
    assert not [r.getMessage() for r in records if MARKER in r.getMessage()]
    caplog.clear()
    # The twin: with --enable-log-requests the request lines (stop strings among the parameters)
    # show the marker, and each names its request id.
    records = _log_lines(tok, caplog, log_requests=True)
    lines = [r for r in records if MARKER in r.getMessage()]
    assert lines and {r.request_id for r in lines} >= {"rid-1", "rid-2"}


def test_every_route_but_health_needs_the_key(tok, monkeypatch):
    monkeypatch.setenv("JAXSERVE_API_KEY", "env-key")
    config = load_config(["--model", "gen", "--api-key", "flag-key"])
    assert config.api_key == ["flag-key", "env-key"] and config.host == "127.0.0.1"
    assert ServeConfig(model="x").host == "127.0.0.1"  # the default bind is loopback
    s = fake_serving(tok, api_key=config.api_key)
    try:
        client = TestClient(s.app)
        routes = [(m, r.path) for r in s.app.routes if isinstance(r, APIRoute) for m in r.methods]
        assert ("GET", "/metrics") in routes and len(routes) >= 12
        for method, path in routes:
            r = client.request(method, path, json={})
            if path == "/health":
                assert r.status_code == 200
                continue
            assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError", path
            for key in ("flag-key", "env-key"):
                ok = client.request(method, path, json={}, headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code != 401, path
    finally:
        s.shutdown()


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
])
def test_chat_templates_run_sandboxed(tok, template):
    """A template that reaches for Python internals is refused (transformers renders templates in
    jinja2's ImmutableSandboxedEnvironment); the request gets a 400, the server goes on."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    assert isinstance(_compile_jinja_template(template).environment, ImmutableSandboxedEnvironment)
    saved = tok.chat_template
    tok.chat_template = template
    s = fake_serving(tok)
    try:
        client = TestClient(s.app)
        r = _chat(client)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "unsafe" in r.json()["error"]["message"]
        r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400
        assert s.added == 0 and client.get("/health").status_code == 200
    finally:
        tok.chat_template = saved
        s.shutdown()
