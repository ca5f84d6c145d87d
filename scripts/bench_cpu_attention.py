"""Paged attention alone on CPU, attention backends interleaved in one process (A B A B ...).

Each variant attends one step's queries over ``--layers`` separate caches (as a model's layers do:
nothing stays in the CPU caches between layers), SmolLM2-135M's heads by default (9 query heads,
3 KV heads, head dim 64), float32 pages ``[P, S, K, H]`` scattered at random (``--block-sizes``:
each page size S its own variants, named ``VARIANT@S`` past 16, at the same KV capacity in tokens).
Reported: the median process CPU time (both threads) and wall time per step over ``--reps``
repetitions.

  python scripts/bench_cpu_attention.py --batch 16 --context 20,124 --variants reference,cpu_xla,cpu
  python scripts/bench_cpu_attention.py --batch 1 --query-len 256 --context 856,856
  python scripts/bench_cpu_attention.py --batch 32 --context 40,160 --variants cpu+acbce78,cpu
  python scripts/bench_cpu_attention.py --batch 32 --context 40,160 --kv-dtype bfloat16 --block-sizes 16,64,128
  python scripts/bench_cpu_attention.py --batch 32 --context 40,160 --kv-dtype bfloat16 --page-orders random,sequential

A variant ``cpu+REV`` is the ``cpu`` backend with the kernel source of git revision REV (built
into a temporary directory, registered under its own FFI target): old and new kernels side by side.
A suffix ``/f32`` keeps that backend's pages float32 (the ``cpu`` backend's are bfloat16); this
script's pages are ``--kv-dtype`` whatever the backend.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxserve.models.attention import AttentionMetadata
    from jaxserve.models.attention_backends import CpuBackend, KVCache


def register_variant(spec: str) -> str:
    """Make ``cpu+REV`` (the cpu backend with the kernel's sources as of git revision REV) and ``NAME/f32``
    (backend NAME with float32 pages) known backends; returns ``spec``."""
    import dataclasses

    from jaxserve.models import attention_backends as ab

    if spec in ab.BACKENDS:
        return spec
    base, _, pages = spec.partition("/")
    backend = ab.BACKENDS.get(base) or _revision_backend(base)
    ab.BACKENDS[spec] = dataclasses.replace(backend, name=spec, bf16_pages=backend.bf16_pages and pages != "f32")
    return spec


def _revision_backend(spec: str) -> CpuBackend:
    """The cpu backend with the attention kernel as of ``cpu+REV``'s revision (its own FFI target)."""
    import dataclasses

    from kernel_revision import build_revision

    from jaxserve.models import attention_backends as ab

    rev = spec.partition("+")[2]
    lib = build_revision("pallas_kernels/cpu_ragged_paged_attention", rev)
    target = f"jaxserve_cpu_rpa_{rev}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.JaxserveCpuRaggedPagedAttention), platform="cpu")

    @dataclasses.dataclass(frozen=True)
    class RevisionBackend(ab.CpuBackend):
        def attend(self, q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
                   sm_scale: float) -> jax.Array:
            call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype))
            return call(q, k_pages, v_pages, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                        sm_scale=np.float32(sm_scale))

    cpu = ab.BACKENDS["cpu"]  # the same weight products as the cpu backend
    return RevisionBackend(**{**{f.name: getattr(cpu, f.name) for f in dataclasses.fields(cpu)}, "name": spec})


def paged_inputs(rng: np.random.Generator, lens: np.ndarray, query_len: int, page_size: int, num_pages: int,
                 layers: int, kv_heads_dim: tuple[int, int], dtype: jnp.dtype, page_order: str = "random",
                 ) -> tuple[AttentionMetadata, list[tuple[jax.Array, jax.Array]]]:
    """(metadata, ``layers`` (K, V) page caches ``[num_pages, page_size, K, H]``) for sequences of
    ``lens`` tokens, their pages scattered at random (page 0 unused), or with ``page_order``
    "sequential" each sequence's pages consecutive (as a prompt's from the block manager's free list)."""
    from jaxserve.models.attention import build_host_metadata

    ids = np.arange(1, num_pages)
    perm, tables, used = ids if page_order == "sequential" else rng.permutation(ids), [], 0
    for s in lens:
        tables.append(perm[used:used + -(-int(s) // page_size)].tolist())
        used += len(tables[-1])
    t = len(lens) * query_len
    meta = build_host_metadata([query_len] * len(lens), lens.tolist(), tables, page_size, num_tokens=t,
                               num_seqs=len(lens), table_width=-(-2048 // page_size), decode_only=query_len == 1)
    shape = (num_pages, page_size, *kv_heads_dim)
    caches = [tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(2))
              for _ in range(layers)]
    return meta, caches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", default="20,124", help="lo,hi context lengths (uniform)")
    p.add_argument("--query-len", type=int, default=1)
    p.add_argument("--variants", default="reference,cpu_xla,cpu")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim")
    p.add_argument("--num-pages", type=int, default=1024)
    p.add_argument("--kv-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--block-sizes", default="16", help="comma-separated KV page sizes, each a variant")
    p.add_argument("--page-orders", default="random",
                   help="comma-separated: random (pages scattered), sequential (each sequence's consecutive); "
                        "each a variant")
    args = p.parse_args(argv)

    from jaxserve.models.attention_backends import get_backend

    n, k, h = (int(x) for x in args.heads.split(","))
    lo, hi = (int(x) for x in args.context.split(","))
    rng = np.random.default_rng(0)
    lens = rng.integers(max(lo, args.query_len), max(hi, args.query_len) + 1, size=args.batch)

    def step(backend: CpuBackend, q: jax.Array, caches: list[KVCache], meta: AttentionMetadata,
             ) -> tuple[jax.Array, jax.Array]:
        outs = [backend.attend(q, kp, vp, meta, sm_scale=h**-0.5) for kp, vp in caches]
        return sum(o.sum() for o in outs), outs[-1]

    t = args.batch * args.query_len
    q = jnp.asarray(rng.standard_normal((t, n, h), np.float32))
    dt = jnp.dtype(args.kv_dtype)
    runs, last = {}, {}  # per page size the same KV capacity in tokens
    for bs, order in itertools.product((int(x) for x in args.block_sizes.split(",")), args.page_orders.split(",")):
        meta, caches = paged_inputs(rng, lens, args.query_len, bs, args.num_pages * 16 // bs, args.layers, (k, h), dt,
                                    order)
        for v in args.variants.split(","):
            name = (v if bs == 16 else f"{v}@{bs}") + ("" if order == "random" else f"/{order}")
            f = jax.jit(functools.partial(step, get_backend(register_variant(v))))
            runs[name] = functools.partial(f, q, caches, meta)
            last[name] = np.asarray(runs[name]()[1])
    base = next(iter(last.values()))
    wall, cpu = ({v: [] for v in runs} for _ in range(2))
    for _ in range(args.reps):
        for v, f in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f())
            wall[v].append((time.perf_counter() - t0) * 1000)
            cpu[v].append((time.process_time() - c0) * 1000)
    print(json.dumps({"batch": args.batch, "context": [lo, hi], "query_len": args.query_len, "variants": {
        v: {"cpu_ms_median": round(statistics.median(cpu[v]), 2), "wall_ms_median": round(statistics.median(wall[v]), 2),
            "wall_ms_min": round(min(wall[v]), 2), "max_abs_diff_vs_first": float(np.max(np.abs(last[v] - base)))}
        for v in runs}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
