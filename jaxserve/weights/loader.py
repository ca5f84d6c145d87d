"""Build a model from a checkpoint: config, abstract Flax module, weights streamed into its state.

The model is created under ``nnx.eval_shape`` (no random init), then every parameter is read
from the checkpoint, converted to the serving dtype on the host and placed on the device. The
graph definition and the parameter state are returned separately: the jitted step merges them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm
from transformers import AutoConfig

from jaxserve.models import ModelConfig, model_class, model_config_from_hf
from jaxserve.sharding import ShardingPlan, make_plan, sharded_config
from jaxserve.weights.gguf_reader import open_gguf
from jaxserve.weights.orbax_checkpoint import read_orbax_config, restore_orbax
from jaxserve.weights.safetensors_reader import count_tensors, iter_safetensors, safetensors_files
from jaxserve.weights.source import ModelSource

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: static graph + parameter state (on device) + its config."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    dtype: jnp.dtype  # parameters
    compute_dtype: jnp.dtype  # activations (and the KV cache)
    load_seconds: float
    plan: ShardingPlan  # mesh and head layout the state is placed with


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = open("/proc/cpuinfo").read()  # noqa: SIM115 - tiny file
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, checkpoint_dtype: str | None, platform: str) -> jnp.dtype:
    """Parameter dtype. ``auto``: the checkpoint's 16-bit dtype on accelerators; on CPU bfloat16
    where the CPU has native bf16 dot products (with float32 activations), else float32."""
    if requested != "auto":
        return DTYPES[requested]
    if platform == "cpu":
        return jnp.bfloat16 if cpu_has_bf16_dot() else jnp.float32
    if checkpoint_dtype in ("float16", "float32"):
        return DTYPES[checkpoint_dtype]
    return jnp.bfloat16


def read_model_config(source: ModelSource) -> tuple[ModelConfig, str | None]:
    """The architecture config and the checkpoint's stored dtype name (None when quantized/unknown)."""
    if source.kind == "gguf":
        return open_gguf(source.path).model_config(), None
    if source.kind == "orbax":
        return read_orbax_config(source.path)
    hf = AutoConfig.from_pretrained(str(source.path), local_files_only=True)
    stored = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return model_config_from_hf(hf), (str(stored).replace("torch.", "") if stored else None)


def _our_path(hf: str) -> tuple | None:
    """Our state path for an HF parameter name; None for names we do not use.

    Every parameter keeps the checkpoint's layout (linear kernels are [out, in])."""
    parts = hf.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if not parts or parts[-1] not in ("weight", "bias"):
        return None
    kind = parts[-1]
    mod = parts[:-1]
    if mod == ["embed_tokens"]:
        return ("embed_tokens", "embedding")
    path = tuple(int(p) if p.isdigit() else p for p in mod)
    if kind == "bias":
        return (*path, "bias")
    return (*path, "weight" if mod[-1].endswith("norm") else "kernel")


def _path_key(path: tuple) -> tuple:
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                keys.append(k.name)
        else:
            keys.append(str(k))
    return tuple(keys)


def _normalize(index: tuple, shape: tuple[int, ...]) -> list[slice]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("strided shard slices are not supported")
        out.append(slice(start, stop))
    return out


QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def _check_fused(name: str, parts: dict, expect: tuple[int, ...], widths: tuple[int, int, int], head_dim: int) -> None:
    """The three checkpoint tensors must add up to the fused parameter (KV heads repeated)."""
    n, k, _ = widths
    q_shape = tuple(parts["q_proj"].shape)
    if ((n + 2 * k) * head_dim, *q_shape[1:]) != expect:
        raise ValueError(f"{name}: q/k/v shapes {q_shape}, {tuple(parts['k_proj'].shape)} do not fit {expect}")


def _read_fused(
    parts: list, widths: tuple[int, int, int], tp: int, head_dim: int, rep: int,
    our_shape: tuple[int, ...], index: tuple,
) -> np.ndarray:
    """Slice ``index`` of the fused q/k/v parameter (kernel [F, D] or bias [F]).

    Output features are laid out shard-major, ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (``_s`` = the
    heads of tensor-parallel shard ``s``), so splitting the features over ``tp`` devices gives each
    one its own q, k and v heads.
    """
    idx = _normalize(index, our_shape)
    rows = idx[0]  # the output-feature axis
    pieces = []
    offset = 0
    for s in range(tp):
        for part, heads in zip(parts, widths, strict=True):
            local = heads // tp * head_dim
            lo, hi = max(rows.start, offset), min(rows.stop, offset + local)
            if lo < hi:
                part_rows = slice(s * local + lo - offset, s * local + hi - offset)
                part_shape = (heads * head_dim, *our_shape[1:])
                is_kv = part is not parts[0]
                pieces.append(_read_shard(part, (part_rows, *idx[1:]), part_shape,
                                          rep=rep if is_kv else 1, head_dim=head_dim))
            offset += local
    return np.concatenate(pieces, axis=0)


def _read_shard(
    tensor, index: tuple, our_shape: tuple[int, ...], *, rep: int, head_dim: int
) -> np.ndarray:
    """Slice ``index`` of a checkpoint tensor (our layout is the checkpoint's).

    ``rep`` > 1: our output features (axis 0) are the checkpoint's KV heads each repeated ``rep``
    times, so our head j is checkpoint head j // rep.
    """
    idx = _normalize(index, our_shape)
    if rep > 1:
        rows = idx[0]  # the output-feature axis (weights and biases alike)
        j = np.arange(rows.start, rows.stop)
        src = (j // head_dim) // rep * head_dim + j % head_dim
        lo, hi = int(src.min()), int(src.max()) + 1
        return np.asarray(tensor[(slice(lo, hi), *idx[1:])])[src - lo]
    return np.asarray(tensor[tuple(idx)])


def _dummy_params(wanted: dict[tuple, Any], plan: ShardingPlan, tied: bool) -> dict[tuple, jax.Array]:
    """Random parameters of ``wanted``'s shapes (by state path), each created directly in its shards.

    Kernels and embeddings ~ N(0, 0.02²), norm weights 1, biases 0 (like vLLM's dummy load format,
    for benchmarks: the step's cost does not depend on the values).
    """
    key = jax.random.key(0)

    @functools.cache
    def init_fn(kind: str, shape: tuple[int, ...], dtype: jnp.dtype, sharding) -> Any:
        """One compiled initializer per (kind, shape, dtype, sharding): layers share them."""
        if kind == "weight":
            return jax.jit(lambda k: jnp.ones(shape, dtype), out_shardings=sharding)
        if kind == "bias":
            return jax.jit(lambda k: jnp.zeros(shape, dtype), out_shardings=sharding)
        return jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype), out_shardings=sharding)

    head, emb = ("lm_head", "kernel"), ("embed_tokens", "embedding")
    made = {}
    for i, (path, leaf) in enumerate(wanted.items()):
        if tied and path == head:
            continue
        name = "/".join(map(str, path))
        made[path] = init_fn(path[-1], tuple(leaf.shape), leaf.dtype, plan.param(name))(jax.random.fold_in(key, i))
    if tied:  # as when loading: the embedding's values (its very buffer on one device)
        made[head] = made[emb] if plan.tp == 1 else jax.jit(lambda x: x, out_shardings=plan.param("lm_head/kernel"))(made[emb])
    return made


def abstract_model(
    cfg: ModelConfig, dtype: jnp.dtype, backend: str, compute_dtype: jnp.dtype, plan: ShardingPlan
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """The model of ``cfg`` laid out for ``plan``, without parameters: (config on the mesh, graph, shapes)."""
    model_cfg = sharded_config(cfg, plan)
    cls = model_class(cfg.architecture)
    mesh = plan.mesh if plan.tp > 1 else None
    abstract = nnx.eval_shape(
        lambda: cls(model_cfg, dtype=dtype, backend=backend, compute_dtype=compute_dtype, mesh=mesh,
                    rngs=nnx.Rngs(0))
    )
    graphdef, abstract_state = nnx.split(abstract)
    return model_cfg, graphdef, abstract_state


def abstract_loaded_model(
    cfg: ModelConfig, dtype: jnp.dtype, *, backend: str, compute_dtype: jnp.dtype, plan: ShardingPlan
) -> LoadedModel:
    """A ``LoadedModel`` whose parameters are shapes with their shardings (ahead-of-time lowering,
    e.g. for a platform this process has no device of; ``plan`` may hold an abstract mesh)."""
    model_cfg, graphdef, abstract_state = abstract_model(cfg, dtype, backend, compute_dtype, plan)

    def placed(path, leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=plan.param("/".join(map(str, _path_key(path)))))

    state = jax.tree_util.tree_map_with_path(placed, abstract_state)
    return LoadedModel(model_cfg, graphdef, state, jnp.dtype(dtype), jnp.dtype(compute_dtype), 0.0, plan)


def load_model(
    source: ModelSource,
    cfg: ModelConfig,
    dtype: jnp.dtype,
    *,
    backend: str = "reference",
    compute_dtype: jnp.dtype | None = None,
    plan: ShardingPlan | None = None,
    progress: bool = True,
    dummy: bool = False,
) -> LoadedModel:
    """Read every parameter of ``source`` into a fresh model of ``cfg``'s architecture.

    ``compute_dtype`` (default: ``dtype``) is the activation dtype. With a ``plan`` every
    parameter goes straight into its shards: each device's slice is read from the checkpoint on
    its own (safetensors are read slice by slice; GGUF tensors are dequantized whole, one at a time).
    ``dummy``: no tensor is read; every parameter is random (see ``_dummy_params``).
    """
    t0 = time.perf_counter()
    compute_dtype = jnp.dtype(compute_dtype or dtype)
    if source.kind == "orbax" and not dummy:
        return restore_orbax(source.path, cfg, dtype, backend=backend, compute_dtype=compute_dtype, plan=plan)
    plan = plan or make_plan(cfg, 1)
    model_cfg, graphdef, abstract_state = abstract_model(cfg, dtype, backend, compute_dtype, plan)
    wanted = {
        _path_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    if dummy:
        made = _dummy_params(wanted, plan, cfg.tie_word_embeddings)
        state = jax.tree_util.tree_map_with_path(lambda p, _: made[_path_key(p)], abstract_state)
        return LoadedModel(model_cfg, graphdef, state, dtype, compute_dtype, time.perf_counter() - t0, plan)
    if source.kind == "gguf":
        ckpt = open_gguf(source.path)
        tensors: Iterator[tuple[str, Any]] = ckpt.iter_tensors(cfg)
        total = ckpt.num_tensors()
    else:
        files = safetensors_files(source.path)
        tensors = iter_safetensors(files)
        total = count_tensors(files)
    np_dtype = np.dtype(dtype)
    loaded: dict[tuple, jax.Array] = {}
    staged: dict[tuple, dict[str, Any]] = {}  # fused q/k/v parts waiting for their siblings

    def place(path: tuple, expect: tuple[int, ...], read_block) -> None:
        def read(index):
            return np.ascontiguousarray(read_block(index).astype(np_dtype, copy=False))

        loaded[path] = jax.make_array_from_callback(expect, plan.param("/".join(map(str, path))), read)

    for name, tensor in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", disable=not progress):
        mapped = _our_path(name)
        if mapped is not None and mapped[-2] in QKV_PARTS:
            fused = (*mapped[:-2], "qkv_proj", mapped[-1])
            if fused in wanted:
                parts = staged.setdefault(fused, {})
                parts[mapped[-2]] = tensor
                if len(parts) == 3:
                    expect = tuple(wanted[fused].shape)
                    widths = (model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.num_kv_heads)
                    _check_fused(name, parts, expect, widths, cfg.head_dim)
                    place(fused, expect, functools.partial(
                        _read_fused, [parts[k] for k in QKV_PARTS], widths, plan.tp, cfg.head_dim,
                        plan.kv_replication, expect))
                    del staged[fused]
                continue
        if mapped is None or mapped not in wanted or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            logger.debug("skipping checkpoint tensor %s", name)
            continue
        targets = [mapped]
        if cfg.tie_word_embeddings and mapped == ("embed_tokens", "embedding"):
            targets.append(("lm_head", "kernel"))  # the tied head (vocab-parallel under TP)
        for path in targets:
            expect = tuple(wanted[path].shape)
            if tuple(tensor.shape) != expect:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit model shape {expect}")
            if path != mapped and plan.tp == 1:
                loaded[path] = loaded[mapped]  # one device: the tied head shares the embedding's buffer
                continue
            place(path, expect, functools.partial(_read_shard, tensor, our_shape=expect, rep=1, head_dim=cfg.head_dim))
    missing = sorted(".".join(map(str, p)) for p in wanted if p not in loaded)
    if missing:
        raise ValueError(f"checkpoint is missing parameters: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    state = jax.tree_util.tree_map_with_path(lambda p, _: loaded[_path_key(p)], abstract_state)
    return LoadedModel(model_cfg, graphdef, state, dtype, compute_dtype, time.perf_counter() - t0, plan)
