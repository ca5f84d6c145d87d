"""Engine correctness on whatever device jax sees: greedy tokens of a tiny random checkpoint, one
run per attention backend, against the tokens recorded on a CPU (``gpu_engine_check.json``).

The checkpoint is ``make_dummy_model.py --shape tiny --weights 0`` (numpy-drawn float32 weights,
the same on every machine); the batch mixes decodes with chunked prefills and shares a prefix (so
prefix caching, block tables and page-crossing reads all matter). Matmuls run at full float32
precision, so a GPU must reproduce the CPU's tokens exactly.

  python scripts/gpu_engine_check.py                     # compare (exit 1 on a mismatch)
  python scripts/gpu_engine_check.py --record            # on a CPU: rewrite the expected tokens
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
    from jaxserve.engine.llm_engine import LLMEngine

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "gpu_engine_check.json"
MAX_TOKENS = 24


def prompts() -> list[list[int]]:
    """Five prompts of 3-70 byte tokens; the last two share their first 40 tokens. (Seed 7: in a
    float64 numpy forward pass no greedy step's top-2 logit gap is under 0.009, far above float32
    noise, so every correct implementation must give exactly these tokens.)"""
    rng = np.random.RandomState(7)
    shared = rng.randint(3, 256, size=40).tolist()
    return [rng.randint(3, 256, size=n).tolist() for n in (3, 17, 70)] + [
        shared + rng.randint(3, 256, size=9).tolist(), shared + rng.randint(3, 256, size=25).tolist(),
    ]


def run_backend(model_dir: Path, backend: str) -> dict:
    """Greedy tokens of every prompt with ``backend``, plus how long the engine took to build."""
    from jaxserve.config import ServeConfig
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams

    cfg = ServeConfig(
        model=str(model_dir), attention_backend=backend, dtype="float32", max_num_seqs=4,
        max_num_batched_tokens=32, block_size=16, max_model_len=256, num_kv_blocks=64,
        compilation_cache_dir="",
    )
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, progress=False)
    built = time.perf_counter() - t0
    out = engine.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return {"tokens": out, "engine_build_s": round(built, 2), "resolved_backend": engine_backend(engine)}


def engine_backend(engine: LLMEngine) -> str:
    """The attention implementation the engine's model actually runs (after ``auto`` resolution)."""
    from flax import nnx

    loaded = engine.runner.loaded
    try:
        return str(nnx.merge(loaded.graphdef, loaded.state).layers[0].self_attn.backend)
    except AttributeError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true", help="write the expected tokens (run on a CPU)")
    p.add_argument("--backends", default="pallas,reference")
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        subprocess.run([sys.executable, str(HERE / "make_dummy_model.py"), "--shape", "tiny", "--output",
                        str(model_dir), "--weights", "0"], check=True, stdout=subprocess.DEVNULL)
        results = {b: run_backend(model_dir, b) for b in args.backends.split(",")}
    device = str(jax.devices()[0])
    if args.record:
        EXPECTED.write_text(json.dumps({"device": device, "jax": jax.__version__,
                                        "tokens": results["reference"]["tokens"]}) + "\n")
        print(f"recorded {EXPECTED}")
        return 0
    expected = json.loads(EXPECTED.read_text())["tokens"]
    ok = True
    for backend, r in results.items():
        same = sum(a == b for got, want in zip(r["tokens"], expected, strict=True) for a, b in zip(got, want, strict=True))
        total = sum(len(w) for w in expected)
        first = next(((i, j) for i, (g, w) in enumerate(zip(r["tokens"], expected, strict=True))
                      for j, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), None)
        ok &= same == total
        print(json.dumps({"engine_check": backend, "device": device, "jax": jax.__version__,
                          "resolved_backend": r["resolved_backend"], "identical_tokens": same, "total_tokens": total,
                          "first_mismatch": first, "engine_build_s": r["engine_build_s"]}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
