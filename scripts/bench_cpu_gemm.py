"""Weight products alone on CPU: XLA's dot_general vs the C++ GEMM (``pallas_kernels/cpu_gemm``),
interleaved in one process (A B A B ...); ``--variants gemm+REV,gemm`` compares the GEMM as of git
revision REV with the working tree's.

Each variant runs one product shape over ``--layers`` separate bf16 weight matrices [N, K] (as a
model's layers do: no weight stays in the CPU caches between layers), chained so that they run one
after another; x is bf16 [M, K], the output float32. Reported per shape and M: median and min wall
time per product, GB/s of weights streamed and GFLOP/s, process CPU time per product (both threads; the fairer figure
on a shared machine, where a descheduled helper thread stretches the wall time), and the ratios
the first variant's over each other's (> 1: the other faster).
Default shapes: SmolLM2-135M's q/k/v (960x576), o (576x576), gate or up (1536x576), down (576x1536).
``--gated``: each step is a gated MLP's first half, silu(x . wg^T) * (x . wu^T) over two weights of
the shape (default 1536x576): ``xla`` and ``gemm`` run two products and XLA's SiLU gating, ``gated``
the fused call (``cpu_gated_gemm``); FLOP and bytes count both products.

  python scripts/bench_cpu_gemm.py --m 2,16,32,64,256
  python scripts/bench_cpu_gemm.py --m 2 --shapes 49152x576 --layers 2
  python scripts/bench_cpu_gemm.py --m 2,32 --variants gemm+main,gemm
  python scripts/bench_cpu_gemm.py --m 1,16,32,64 --gated --variants gemm,gated
  python scripts/bench_cpu_gemm.py --m 1,16,64 --gated --variants gated+main,gated
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def _revision_target(rev: str, symbol: str) -> str:
    """The FFI target of ``symbol`` in the GEMM kernel as of ``rev``, registered under its own name."""
    from kernel_revision import build_revision

    lib = build_revision("pallas_kernels/cpu_gemm", rev)
    target = f"jaxserve_{symbol}_{rev}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return target


def _revision_gemm(rev: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The plain product as of ``rev``."""
    target = _revision_target(rev, "JaxserveCpuGemm")
    return lambda x, w: jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))(x, w)


def _revision_gated(rev: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """The fused gated product as of ``rev``."""
    target = _revision_target(rev, "JaxserveCpuGatedGemm")
    return lambda x, wg, wu: jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct((x.shape[0], wg.shape[0]), jnp.bfloat16))(x, wg, wu)


def product(variant: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``xla`` (dot_general), ``gemm`` (the working tree's kernel) or ``gemm+REV``."""
    from jaxserve.pallas_kernels.cpu_gemm.ops import cpu_gemm

    if variant == "gemm":
        return cpu_gemm
    if variant.startswith("gemm+"):
        return _revision_gemm(variant.partition("+")[2])
    dims = (((1,), (1,)), ((), ()))
    return lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def gated(variant: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """bf16 ``silu(x . wg^T) * (x . wu^T)``: ``gated`` (the fused call), ``gated+REV`` (as of git
    revision REV) or two of ``variant``'s products and XLA's SiLU gating and convert (one fusion, as
    in the model)."""
    from jaxserve.pallas_kernels.cpu_gemm.ops import cpu_gated_gemm

    if variant == "gated":
        return cpu_gated_gemm
    if variant.startswith("gated+"):
        return _revision_gated(variant.partition("+")[2])
    f = product(variant)
    return lambda x, wg, wu: (jax.nn.silu(f(x, wg)) * f(x, wu)).astype(jnp.bfloat16)


def chain(variant: str, pairs: bool = False) -> Callable[[jax.Array, list[jax.Array]], jax.Array]:
    """``variant``'s product over each weight in turn (``pairs``: ``gated`` over consecutive pairs),
    jitted (each waits for the last)."""
    f = gated(variant) if pairs else product(variant)

    def run(x: jax.Array, ws: list[jax.Array]) -> jax.Array:
        for i in range(0, len(ws), 2 if pairs else 1):  # each waits for the last: no two run at once
            y = f(x, ws[i], ws[i + 1]) if pairs else f(x, ws[i])
            x = x + (y[:, :1] * 0).astype(x.dtype)
        return y

    return jax.jit(run)


def bench_shape(m: int, n: int, k: int, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """One JSON row: every variant's times for x [m, k] . w [n, k]^T, interleaved, and the first's ratios."""
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
    mats = 2 if args.gated else 1
    ws = [jnp.asarray(rng.standard_normal((n, k), np.float32), jnp.bfloat16) for _ in range(args.layers * mats)]
    runs = {v: chain(v, args.gated) for v in args.variants.split(",")}
    for f in runs.values():
        f(x, ws).block_until_ready()
    times: dict[str, list[float]] = {v: [] for v in runs}
    cpu: dict[str, list[float]] = {v: [] for v in runs}
    for _ in range(args.reps):
        for v, f in runs.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.inner):
                f(x, ws).block_until_ready()
            times[v].append((time.perf_counter() - t) / (args.inner * args.layers))
            cpu[v].append((time.process_time() - c) / (args.inner * args.layers))
    row = {"m": m, "n": n, "k": k, "pair": args.gated}
    n *= mats  # both products' weights and FLOP
    for v, ts in times.items():
        med, cmed = statistics.median(ts), statistics.median(cpu[v])
        row[v] = {"us_median": round(med * 1e6, 1), "us_min": round(min(ts) * 1e6, 1),
                  "cpu_us_median": round(cmed * 1e6, 1), "GB_s": round(n * k * 2 / med / 1e9, 1),
                  "GFLOP_s": round(2 * m * n * k / med / 1e9, 1),
                  "GFLOP_per_cpu_s": round(2 * m * n * k / cmed / 1e9, 1)}
    first, *others = runs
    for v in others:
        row[f"{first}_over_{v}"] = round(row[first]["us_median"] / row[v]["us_median"], 2)
        row[f"{first}_over_{v}_min"] = round(row[first]["us_min"] / row[v]["us_min"], 2)
        row[f"{first}_over_{v}_cpu"] = round(row[first]["cpu_us_median"] / row[v]["cpu_us_median"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="2,16,32,64,256", help="comma-separated rows of x")
    p.add_argument("--shapes", default="960x576,576x576,1536x576,576x1536", help="NxK weight shapes")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--variants", default="xla,gemm",
                   help="xla, gemm, gemm+REV (the kernel as of git revision REV), gated or gated+REV (with --gated)")
    p.add_argument("--gated", action="store_true", help="gate and up products with SiLU gating (see above)")
    args = p.parse_args(argv)
    if args.gated and args.shapes == p.get_default("shapes"):
        args.shapes = "1536x576"
    if any(v.partition("+")[0] == "gated" for v in args.variants.split(",")) and not args.gated:
        p.error("the gated variant needs --gated")
    from jaxserve.pallas_kernels.cpu_gemm import ops

    if not ops.available():
        print("the CPU GEMM kernel could not be built", file=sys.stderr)
        return 1
    print(json.dumps({"jax": jax.__version__, "cpu": platform.processor() or platform.machine(),
                      "native_bf16": ops.native_bf16(), "layers": args.layers}))
    rng = np.random.default_rng(0)
    for m in (int(s) for s in args.m.split(",")):
        for shape in args.shapes.split(","):
            n, k = (int(s) for s in shape.split("x"))
            print(json.dumps(bench_shape(m, n, k, args, rng)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
