"""How consecutive the engine's KV pages are per sequence in steady state: the BlockManager's own
allocation and free policy under continuous batching, no model. ``--slots`` requests decode one
token per step; each has a prompt of uniform ``--prompt lo,hi`` tokens and ``--gen`` output tokens,
and a finished one is freed and replaced by a new one (its prompt allocated at admission). After
``--steps`` steps it reports, over the live sequences, the fraction of neighbouring block-table
entries that are adjacent pages (id + 1): 1.0 means every sequence reads one contiguous run, 0 that
every page is somewhere else (the decode kernel's cost, docs/benchmarks.md §15,
``bench_cpu_attention.py --page-orders random,sequential``).

    .venv/bin/python scripts/block_locality.py --num-blocks 5700 --slots 32 --steps 3000
"""

from __future__ import annotations

import argparse
import json
import types

import numpy as np

from jaxserve.engine.block_manager import BlockManager


def simulate(num_blocks: int, slots: int, prompt: tuple[int, int], gen: int, steps: int, block_size: int,
             seed: int = 0) -> list[list[int]]:
    """The live sequences' block tables after ``steps`` decode steps of the policy above."""
    rng = np.random.default_rng(seed)
    bm = BlockManager(num_blocks, block_size)

    def admit() -> types.SimpleNamespace:
        r = types.SimpleNamespace(block_ids=[], num_computed_tokens=0, left=gen)
        n = int(rng.integers(prompt[0], prompt[1] + 1))
        bm.allocate(r, n)
        r.num_computed_tokens = n
        return r

    live = [admit() for _ in range(slots)]
    for _ in range(steps):
        for i, r in enumerate(live):
            bm.allocate(r, 1)
            r.num_computed_tokens += 1
            r.left -= 1
            if r.left == 0:
                bm.free(r)
                live[i] = admit()
    return [r.block_ids for r in live]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--prompt", default="30,100", help="lo,hi prompt tokens (uniform)")
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args(argv)
    lo, hi = (int(x) for x in args.prompt.split(","))
    tables = simulate(args.num_blocks, args.slots, (lo, hi), args.gen, args.steps, args.block_size)
    pairs = sum(len(t) - 1 for t in tables)
    adjacent = sum(b - a == 1 for t in tables for a, b in zip(t, t[1:]))
    print(json.dumps({"pairs": pairs, "adjacent": adjacent, "adjacent_fraction": round(adjacent / max(pairs, 1), 3),
                      "example_tables": tables[:2]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
