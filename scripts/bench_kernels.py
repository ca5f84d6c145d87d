"""Kernel benchmark: ragged paged attention against the memory roofline and its peers.

For a grid of decode shapes (batch x context x heads, bf16, page 16) it reports the median time
of our Pallas kernel, jax's bundled ``pallas.ops.gpu.paged_attention`` (decode only) and the
pure-jnp reference; achieved GB/s counting the K/V bytes that must be read plus q and the output;
and the % of the card's copy bandwidth measured in the same run. For a prefill chunk (2048 new
tokens over a 2048-token cached prefix) it reports TFLOP/s against ``jax.nn.dot_product_attention``
(cuDNN) on the same dense shapes.

Times are device times: each op runs ``--iters`` times inside one jitted ``fori_loop`` (so host
dispatch is amortised), median of ``--trials``.

  python scripts/bench_kernels.py                 # on a GPU
  python scripts/bench_kernels.py --smoke         # tiny shapes, interpret mode (checks the script on CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import RaggedMetadata, build_host_metadata
from jaxserve.pallas_kernels.ragged_paged_attention.ops import ragged_paged_attention
from jaxserve.pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention

HEADS = {"qwen2.5-7b": (28, 4, 128), "qwen2.5-0.5b": (14, 2, 64)}


def device_time(fn: Callable[..., jax.Array], *args: jax.Array | RaggedMetadata, iters: int, trials: int) -> float:
    """Median seconds per call of ``fn(*args)`` with calls chained inside one jitted loop."""

    @jax.jit
    def repeated(*a: jax.Array | RaggedMetadata) -> jax.Array:
        def body(_: int, carry: jax.Array) -> jax.Array:
            out = fn(carry, *a[1:])
            return carry + (0 * out.reshape(-1)[0]).astype(carry.dtype)  # a dependency, no CSE

        return jax.lax.fori_loop(0, iters, body, a[0])

    repeated(*args).block_until_ready()
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        repeated(*args).block_until_ready()
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


@contextlib.contextmanager
def recorded(row: dict[str, object], name: str) -> Iterator[None]:
    """Run one measurement; a failure is recorded in ``row`` (``<name>_error``) instead of raised."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a benchmark reports every case it can
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def copy_bandwidth(nbytes: int, iters: int, trials: int) -> float:
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    t = device_time(lambda a: a * 1.0001, x, iters=iters, trials=trials)
    return 2 * nbytes / t  # read + write


def decode_case(batch: int, context: int, heads: tuple[int, int, int], page: int, rng: np.random.RandomState,
                ) -> tuple[jax.Array, jax.Array, jax.Array, RaggedMetadata, np.ndarray]:
    """bf16 queries and K/V pages of ``batch`` decode rows at ``context`` tokens, pages scattered at random;
    (q, k pages, v pages, metadata, block tables)."""
    n, k, h = heads
    pages_per_seq = -(-context // page)
    num_pages = batch * pages_per_seq + 1
    perm = rng.permutation(np.arange(1, num_pages))
    tables = perm.reshape(batch, pages_per_seq).tolist()
    meta = build_host_metadata([1] * batch, [context] * batch, tables, page, num_tokens=batch, num_seqs=batch,
                               table_width=pages_per_seq, num_rows=batch, row_width=1)
    key = jax.random.key(0)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, n, h), jnp.bfloat16)
    k_pages = jax.random.normal(kk, (num_pages, page, k, h), jnp.bfloat16)
    v_pages = jax.random.normal(kv, (num_pages, page, k, h), jnp.bfloat16)
    return q, k_pages, v_pages, meta, np.asarray(tables, np.int32)


def decode_cases(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(heads, batch, context) of every decode case: tiny for --smoke, the targets' two for --quick."""
    if args.smoke:
        return [("tiny", b, 64) for b in (1, 2)]
    if args.quick:  # the GPU check's cases: the targets' shapes
        return [("qwen2.5-7b", 64, 4096), ("qwen2.5-0.5b", 256, 1024)]
    return [(hn, b, ctx) for hn in HEADS for b in (1, 8, 64, 256) for ctx in (512, 4096, 32768)]


def run(args: argparse.Namespace) -> list[dict]:
    """Every decode case (ours, the jnp reference, jax's bundled GPU kernel), then the prefill row."""
    rng = np.random.RandomState(0)
    interpret = args.smoke
    out: list[dict] = []
    bw = copy_bandwidth(args.copy_bytes, args.iters, args.trials)
    print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, "copy_GBps": bw / 1e9}), flush=True)
    for hname, b, ctx in decode_cases(args):
        heads = {"tiny": (4, 2, 64), **HEADS}[hname]
        n, k, h = heads
        if b * ctx * k * h * 2 * 2 > args.max_cache_bytes:
            continue
        q, kp, vp, meta, tables = decode_case(b, ctx, heads, args.page, rng)
        must_read = 2 * b * ctx * k * h * 2 + 2 * q.size * 2  # K, V (bf16) + q + out
        ours = functools.partial(ragged_paged_attention, sm_scale=h**-0.5, interpret=interpret,
                                 kv_block_tokens=args.kv_block_tokens)
        row = {"op": "decode", "heads": hname, "batch": b, "context": ctx}
        with recorded(row, "ours"):
            t = device_time(lambda qq, kp, vp, m: ours(qq, kp, vp, m), q, kp, vp, meta,
                            iters=args.iters, trials=args.trials)
            row.update(ours_ms=1e3 * t, ours_GBps=must_read / t / 1e9, ours_pct_copy=100 * must_read / t / bw)
        ref = functools.partial(ref_ragged_paged_attention, sm_scale=h**-0.5)
        with recorded(row, "reference"):
            t = device_time(lambda qq, kp, vp, m: ref(qq, kp, vp, m), q, kp, vp, meta,
                            iters=args.iters, trials=args.trials)
            row.update(reference_ms=1e3 * t, reference_GBps=must_read / t / 1e9)
        if not args.smoke:
            from jax.experimental.pallas.ops.gpu import paged_attention as bundled

            kph, vph = kp.transpose(2, 0, 1, 3), vp.transpose(2, 0, 1, 3)  # [K, P, S, H]
            lengths = jnp.full((b,), ctx, jnp.int32)
            bt = jnp.asarray(tables)
            pps = tables.shape[1]
            ks = max(1, min(16, pps // 8))
            while pps % ks:
                ks -= 1
            fn = functools.partial(bundled.paged_attention, pages_per_compute_block=min(8, pps // ks),
                                   k_splits=ks)
            with recorded(row, "bundled"):
                t = device_time(lambda qq, a, c, d, e: fn(qq, a, c, d, e), q, kph, vph, bt, lengths,
                                iters=args.iters, trials=args.trials)
                row.update(bundled_ms=1e3 * t, bundled_GBps=must_read / t / 1e9)
                if "ours_ms" in row:
                    row["speedup_vs_bundled"] = row["bundled_ms"] / row["ours_ms"]
        print(json.dumps(row), flush=True)
        out.append(row)
    row = prefill_row(args, interpret)
    print(json.dumps(row), flush=True)
    out.append(row)
    return out


def prefill_row(args: argparse.Namespace, interpret: bool) -> dict:
    """A chunk of new tokens over a cached prefix, in rows of 16 queries: ours (and cuDNN's dense
    attention, off --smoke) in TFLOP/s."""
    chunk, prefix = (32, 32) if args.smoke else (2048, 2048)
    n, k, h = (4, 2, 64) if args.smoke else HEADS["qwen2.5-7b"]
    total = chunk + prefix
    pages = -(-total // args.page)
    q = jax.random.normal(jax.random.key(1), (chunk, n, h), jnp.bfloat16)
    kp = jax.random.normal(jax.random.key(2), (pages + 1, args.page, k, h), jnp.bfloat16)
    vp = jax.random.normal(jax.random.key(3), (pages + 1, args.page, k, h), jnp.bfloat16)
    rw = 16
    meta = build_host_metadata([chunk], [total], [list(range(1, pages + 1))], args.page, num_tokens=chunk,
                               num_seqs=1, table_width=pages, num_rows=chunk // rw, row_width=rw)
    ours = functools.partial(ragged_paged_attention, sm_scale=h**-0.5, interpret=interpret,
                             kv_block_tokens=args.kv_block_tokens)
    flops = 4 * chunk * (prefix + (chunk + 1) / 2) * n * h  # causal over the new chunk
    row = {"op": "prefill", "chunk": chunk, "prefix": prefix, "heads": f"{n}/{k}x{h}"}
    with recorded(row, "ours"):
        t = device_time(lambda qq, a, c, m: ours(qq, a, c, m), q, kp, vp, meta, iters=max(1, args.iters // 4),
                        trials=args.trials)
        row.update(ours_ms=1e3 * t, ours_TFLOPs=flops / t / 1e12)
    if not args.smoke:
        qd = q[None]
        kd = jax.random.normal(jax.random.key(4), (1, total, k, h), jnp.bfloat16)
        vd = jax.random.normal(jax.random.key(5), (1, total, k, h), jnp.bfloat16)
        cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
        dense_flops = 4 * chunk * total * n * h
        with recorded(row, "cudnn"):
            t = device_time(lambda a, b_, c: cudnn(a, b_, c), qd, kd, vd, iters=max(1, args.iters // 4),
                            trials=args.trials)
            row.update(cudnn_dense_ms=1e3 * t, cudnn_TFLOPs=dense_flops / t / 1e12)
            if "ours_ms" in row:  # >1: ours is faster per FLOP than cuDNN
                row["ours_vs_cudnn_flop_rate"] = row["ours_TFLOPs"] / row["cudnn_TFLOPs"]
    return row


def sweep(args: argparse.Namespace) -> list[dict]:
    """Our kernel's knobs (keys per loop step, warps, pipeline stages) on the targets' decode case
    and the prefill chunk: one row per setting, to pick the defaults from."""
    rng = np.random.RandomState(0)
    bw = copy_bandwidth(args.copy_bytes, args.iters, args.trials)
    rows = []
    n, k, h = HEADS["qwen2.5-7b"]
    q, kp, vp, meta, _ = decode_case(64, 4096, (n, k, h), args.page, rng)
    must_read = 2 * 64 * 4096 * k * h * 2 + 2 * q.size * 2
    chunk, prefix = 2048, 2048
    pq = jax.random.normal(jax.random.key(1), (chunk, n, h), jnp.bfloat16)
    pages = -(-(chunk + prefix) // args.page)
    pkp = jax.random.normal(jax.random.key(2), (pages + 1, args.page, k, h), jnp.bfloat16)
    pmeta = build_host_metadata([chunk], [chunk + prefix], [list(range(1, pages + 1))], args.page, num_tokens=chunk,
                                num_seqs=1, table_width=pages, num_rows=chunk // 16, row_width=16)
    flops = 4 * chunk * (prefix + (chunk + 1) / 2) * n * h
    for blk in (64, 128, 256):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                fn = functools.partial(ragged_paged_attention, sm_scale=h**-0.5, kv_block_tokens=blk,
                                       num_warps=warps, num_stages=stages)
                row = {"op": "sweep", "kv_block_tokens": blk, "num_warps": warps, "num_stages": stages}
                with recorded(row, "decode"):
                    t = device_time(lambda qq, a, c, m: fn(qq, a, c, m), q, kp, vp, meta, iters=args.iters,
                                    trials=args.trials)
                    row.update(decode_ms=1e3 * t, decode_pct_copy=100 * must_read / t / bw)
                with recorded(row, "prefill"):
                    t = device_time(lambda qq, a, c, m: fn(qq, a, c, m), pq, pkp, pkp, pmeta,
                                    iters=max(1, args.iters // 4), trials=args.trials)
                    row.update(prefill_ms=1e3 * t, prefill_TFLOPs=flops / t / 1e12)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (any device)")
    p.add_argument("--quick", action="store_true", help="only the targets' shapes (the GPU check)")
    p.add_argument("--sweep", action="store_true", help="our kernel's block/warps/stages settings (GPU)")
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--kv-block-tokens", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--copy-bytes", type=int, default=1 << 30)
    p.add_argument("--max-cache-bytes", type=int, default=24 << 30)
    p.add_argument("--save-result", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.iters, args.trials, args.copy_bytes = 2, 1, 1 << 20
    rows = sweep(args) if args.sweep else run(args)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
