"""schemathesis over every route of the app (stand-in engines, real tokenizer): no 5xx, every 4xx in
OpenAI's error shape, /health 200 afterwards; ≥ 2,000 cases (``scripts/fuzz.py`` runs ≥ 10,000)."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from tests.server.fake_app import fake_serving, tiny_tokenizer
from tests.server.fuzzing import check_response, fuzz_app

CI_PER_OPERATION = 130  # x 8 POST routes x (valid, invalid) + the GETs: ~2,080 cases, ~36 s here
CI_DEADLINE_S = 120.0  # a slow CI host stops drawing (between operations) and says so below


def test_every_route_survives_fuzzing(tmp_path_factory):
    s = fake_serving(tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    try:
        report = fuzz_app(s.app, CI_PER_OPERATION, seed=1234, deadline_s=CI_DEADLINE_S)
    finally:
        s.shutdown()
    print(report.summary())
    assert report.failures == []
    assert report.seconds > CI_DEADLINE_S or report.cases >= 2000, report.summary()
    assert report.statuses[200] > 100 and report.statuses[400] > 1000  # both kinds of input were drawn


class Body(BaseModel):
    x: int


def test_the_checks_detect_a_broken_route():
    """The detector's twin: a route that 500s on some inputs and one whose 4xx is not OpenAI's shape."""
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {}

    @app.post("/boom")
    def boom(body: Body) -> dict:
        if body.x > 3:
            raise RuntimeError("bug")
        return {}

    report = fuzz_app(app, 30)
    assert any("/boom" in f and "500" in f or "raised" in f for f in report.failures), report.failures
    assert any("not in OpenAI's error shape" in f for f in report.failures)  # FastAPI's own 422 body
    assert check_response(503, b"{}", "application/json") is not None
    assert check_response(400, b'{"error": {"message": "m", "type": "t", "param": null, "code": 400}}',
                          "application/json") is None
