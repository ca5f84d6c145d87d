"""How consecutive the engine's KV pages are per sequence in steady state, and what the placement
costs the prefix cache: the BlockManager's own allocation and free policy under continuous
batching, no model. ``--slots`` requests decode one token per step; each has a prompt of uniform
``--prompt lo,hi`` tokens and ``--gen lo,hi`` output tokens, and a finished one is freed and
replaced by a new one. With ``--prefixes N`` prefix caching is on and each prompt starts with one of
N shared prefixes (5-40 blocks, Zipf popularity), so cached pages compete with new runs.

Reports the fraction of neighbouring block-table entries that are adjacent pages (id + 1), sampled
over the live sequences every 50 steps (1.0: every sequence reads one contiguous run; the decode
kernel's cost, docs/benchmarks.md §15, ``bench_cpu_attention.py --page-orders random,sequential``),
the prefix-cache hit rate (hit / looked-up prompt tokens), and the placement's host time.

    .venv/bin/python scripts/block_locality.py --num-blocks 5825 --slots 64 --gen 128,128
    .venv/bin/python scripts/block_locality.py --num-blocks 2000 --slots 32 --prefixes 100 --steps 4000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from jaxserve.engine.block_manager import BlockManager
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams

VOCAB = 30000


class Workload:
    """Requests of random prompts (after a shared prefix when there are any) and lengths."""

    def __init__(self, bm: BlockManager, args: argparse.Namespace) -> None:
        self.bm, self.args = bm, args
        self.rng = np.random.default_rng(args.seed)
        bs = bm.block_size
        self.prefixes = [self.rng.integers(3, VOCAB, int(self.rng.integers(5, 41)) * bs).tolist()
                         for _ in range(args.prefixes)]
        weights = 1.0 / np.arange(1, args.prefixes + 1)
        self.popularity = weights / weights.sum()
        self.count = 0
        self.seconds = 0.0  # host time inside allocate/free

    def admit(self) -> Request | None:
        """A new request with its prompt allocated (after its cached prefix), or None if it does not fit."""
        a, rng, bm = self.args, self.rng, self.bm
        self.count += 1
        prefix = self.prefixes[rng.choice(len(self.prefixes), p=self.popularity)] if self.prefixes else []
        prompt = prefix + rng.integers(3, VOCAB, int(rng.integers(a.prompt[0], a.prompt[1] + 1))).tolist()
        req = Request(f"r{self.count}", prompt, SamplingParams(), max_tokens=int(rng.integers(a.gen[0], a.gen[1] + 1)))
        t = time.perf_counter()
        hits = bm.match_prefix(req)
        n = req.num_tokens - len(hits) * bm.block_size
        if not bm.can_admit(req, hits, n):
            return None
        bm.acquire_prefix(req, hits)
        bm.allocate(req, n)
        self.seconds += time.perf_counter() - t
        req.num_computed_tokens += n
        bm.register_full_blocks(req, req.num_tokens)
        return req

    def decode(self, req: Request) -> bool:
        """One output token for ``req``; False when it finished (or had to give its pages back)."""
        t = time.perf_counter()
        if not self.bm.can_allocate(req, 1):
            self.bm.free(req)
            return False
        self.bm.allocate(req, 1)
        req.output_token_ids.append(int(self.rng.integers(3, VOCAB)))
        req.num_computed_tokens += 1
        self.bm.register_full_blocks(req, req.num_tokens)
        done = len(req.output_token_ids) >= req.max_tokens
        if done:
            self.bm.free(req)
        self.seconds += time.perf_counter() - t
        return not done


def simulate(args: argparse.Namespace) -> dict:
    """Run the workload; the adjacency, hit rate and host time it measured."""
    bm = BlockManager(args.num_blocks, args.block_size, enable_prefix_caching=args.prefixes > 0)
    work = Workload(bm, args)
    live: list[Request | None] = [work.admit() for _ in range(args.slots)]
    pairs = adjacent = 0
    for step in range(args.steps):
        for i, req in enumerate(live):
            if req is None or not work.decode(req):
                live[i] = work.admit()
        if step % 50 == 49:
            tables = [r.block_ids for r in live if r is not None]
            pairs += sum(len(t) - 1 for t in tables)
            adjacent += sum(b - a == 1 for t in tables for a, b in zip(t, t[1:]))
    return {"adjacent_fraction": round(adjacent / max(pairs, 1), 3),
            "prefix_hit_rate": round(bm.prefix_hits / max(bm.prefix_queries, 1), 3),
            "host_us_per_step": round(work.seconds / args.steps * 1e6, 1),
            "example_tables": [r.block_ids for r in live[:2] if r is not None]}


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--prompt", type=_pair, default=(30, 100), help="lo,hi prompt tokens (uniform), after any prefix")
    p.add_argument("--gen", type=_pair, default=(64, 64), help="lo,hi output tokens (uniform)")
    p.add_argument("--prefixes", type=int, default=0, help="shared prompt prefixes (0: prefix caching off)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    print(json.dumps(simulate(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
