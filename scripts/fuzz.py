"""Offline fuzzing of every route with schemathesis (≥ 10,000 cases by default).

    .venv/bin/python scripts/fuzz.py [--per-operation 640] [--seed 0]

Serves the real app over stand-in engines (``tests/server/fake_app.py``: the tiny test tokenizer
and chat template, real admission; no model) and draws ``--per-operation`` valid and as many
invalid requests for every POST route from the app's own OpenAPI schema (the GET routes have no
inputs: one case each). Invariants: no 5xx, every 4xx in OpenAI's error shape, /health 200 after
each route. Prints the figure for docs/benchmarks.md; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests.server.fake_app

from tests.server.fake_app import fake_serving, tiny_tokenizer  # noqa: E402
from tests.server.fuzzing import fuzz_app  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-operation", type=int, default=640, help="valid and invalid cases per POST route")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        serving = fake_serving(tiny_tokenizer(pathlib.Path(d)))
        try:
            report = fuzz_app(serving.app, args.per_operation, seed=args.seed)
        finally:
            serving.shutdown()
    import schemathesis

    print(f"schemathesis {schemathesis.__version__ if hasattr(schemathesis, '__version__') else '?'}, "
          f"Python {platform.python_version()}: {report.summary()}")
    for f in report.failures:
        print("FAIL", f)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
