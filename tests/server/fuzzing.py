"""Property-based fuzzing of every route with schemathesis, from the app's own OpenAPI schema.

Each operation gets ``per_operation`` valid (positive) and as many invalid (negative) cases, drawn
by hypothesis from ``/openapi.json``. Invariants checked on every response: no 5xx; every 4xx is
OpenAI's error JSON (``message``, ``type``, ``param``, ``code`` = the status); and ``/health``
answers 200 after each operation. Shared by ``tests/server/test_fuzz.py`` (CI) and
``scripts/fuzz.py`` (offline, ≥ 10,000 cases).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from fastapi import FastAPI
from fastapi.testclient import TestClient


@dataclasses.dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter = dataclasses.field(default_factory=Counter)
    failures: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"{self.cases} cases in {self.seconds:.1f}s, {len(self.failures)} failures; statuses {codes}")


def check_response(status: int, body: bytes, content_type: str) -> str | None:
    """What is wrong with one response (None: nothing)."""
    if status >= 500:
        return f"{status}: {body[:300]!r}"
    if status < 400:
        return None
    if not content_type.startswith("application/json"):
        return f"{status} without a JSON body: {content_type}"
    import json

    err = json.loads(body).get("error")
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"{status} not in OpenAI's error shape: {body[:300]!r}"
    if err["code"] != status or not isinstance(err["message"], str) or not err["message"]:
        return f"{status} with a bad code or message: {body[:300]!r}"
    if err["param"] is not None and not isinstance(err["param"], str):
        return f"{status} with a non-string param: {body[:300]!r}"
    return None


def fuzz_app(app: FastAPI, per_operation: int, *, seed: int = 0, deadline_s: float | None = None) -> FuzzReport:
    """Fuzz every operation of ``app`` (``per_operation`` positive + negative cases each); stops
    early (between operations) once ``deadline_s`` seconds have passed."""
    import schemathesis
    from schemathesis import GenerationMode

    report = FuzzReport()
    t0 = time.perf_counter()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    client = TestClient(app, raise_server_exceptions=False)  # for /health
    operations = [r.ok() for r in schema.get_all_operations()]
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                break
            _fuzz_operation(op, mode, per_operation, seed, report)
        r = client.get("/health")
        if r.status_code != 200:
            report.failures.append(f"/health {r.status_code} after {op.method.upper()} {op.path}")
    report.seconds = time.perf_counter() - t0
    return report


def _fuzz_operation(op, mode, n: int, seed: int, report: FuzzReport) -> None:
    label = f"{op.method.upper()} {op.path} ({mode.value})"

    @settings(max_examples=n, deadline=None, database=None, derandomize=False, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=hypothesis.Verbosity.quiet)
    @hypothesis.seed(seed)
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        try:
            r = case.call()
        except Exception as e:  # noqa: BLE001 - the app raised instead of answering: a 500
            report.cases += 1
            report.statuses[500] += 1
            report.failures.append(f"{label}: raised {type(e).__name__}: {e}; body: {str(case.body)[:300]}")
            return
        report.cases += 1
        report.statuses[r.status_code] += 1
        ctype = r.headers.get("content-type") or [""]  # schemathesis' Response: header -> list of values
        problem = check_response(r.status_code, r.content, ctype[0] if isinstance(ctype, list) else ctype)
        if problem is not None and len(report.failures) < 50:
            report.failures.append(f"{label}: {problem}; body: {str(case.body)[:300]}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # no invalid input exists (a GET without parameters)
        pass
