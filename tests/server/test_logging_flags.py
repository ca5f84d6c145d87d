"""vLLM's logging flags: request log, periodic stats line, access log without /health polls."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

from fastapi.testclient import TestClient

from jaxserve.config import ServeConfig
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.interface import EngineMetrics
from jaxserve.engine.stats_logger import StatsLogger
from jaxserve.serve import _drop_health_polls
from jaxserve.server.app import build_app
from tests.server.test_engine_states import FakeLLM


def _completion(log_requests: bool, caplog) -> list[str]:
    engine = AsyncEngine(FakeLLM, log_requests=log_requests)
    engine.start()
    engine.wait_ready(5)
    with caplog.at_level(logging.INFO, logger="jaxserve.engine.async_engine"):
        r = TestClient(build_app(ServeConfig(model="m"), engine)).post(
            "/v1/completions", json={"prompt": "xyz", "max_tokens": 2}
        )
    engine.shutdown()
    assert r.status_code == 200
    return [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("request ")]


def test_request_log_only_when_enabled(caplog):
    lines = _completion(True, caplog)
    assert len(lines) == 1 and ": 3 prompt tokens, " in lines[0] and "max_tokens=2" in lines[0]
    caplog.clear()
    assert _completion(False, caplog) == []


def _metrics(**changes) -> EngineMetrics:
    zero = {f.name: 0 for f in dataclasses.fields(EngineMetrics)}
    return EngineMetrics(**{**zero, "kv_total_blocks": 100, **changes})


def test_stats_line_reports_rates_since_the_last_line():
    snapshot = [_metrics()]
    stats = StatsLogger(SimpleNamespace(metrics=lambda: snapshot[0], is_ready=True))
    assert stats.line(0.0) is None  # the baseline
    assert stats.line(10.0) is None  # idle: nothing logged
    snapshot[0] = _metrics(prompt_tokens=300, generation_tokens=50, kv_used_blocks=25, prefix_hits=30,
                           prefix_queries=120, num_running=2)
    assert stats.line(20.0) == (
        "prompt throughput 30.0 tokens/s, generation throughput 5.0 tokens/s, running 2 reqs, waiting 0 reqs, "
        "KV cache usage 25.0%, prefix cache hit rate 25.0%"
    )
    assert "generation throughput 0.0 tokens/s, running 2 reqs" in stats.line(30.0)  # still busy


def _access_record(path: str, status: int) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5", "GET", path, "1.1", status), None)


def test_access_log_drops_only_health_polls():
    assert not _drop_health_polls(_access_record("/health", 200))
    assert not _drop_health_polls(_access_record("/health", 503))
    assert _drop_health_polls(_access_record("/v1/models", 200))
    assert _drop_health_polls(_access_record("/healthz", 404))


def test_access_line_carries_the_request_id_through_uvicorns_formatter():
    from uvicorn.logging import AccessFormatter

    from jaxserve.server.request_id import ACCESS_FORMAT, AccessLogRequestId, request_id

    formatter = AccessFormatter(fmt=ACCESS_FORMAT, use_colors=False)
    outside = _access_record("/v1/models", 200)
    assert AccessLogRequestId().filter(outside)
    assert formatter.format(outside).endswith('"GET /v1/models HTTP/1.1" 200 OK')
    token = request_id.set("req-42")
    try:
        inside = _access_record("/v1/models", 200)
        assert AccessLogRequestId().filter(inside)
        assert inside.args == ("127.0.0.1:5", "GET", "/v1/models", "1.1", 200)  # uvicorn unpacks five
        assert formatter.format(inside).endswith('"GET /v1/models HTTP/1.1" 200 OK [req-42]')
    finally:
        request_id.reset(token)
