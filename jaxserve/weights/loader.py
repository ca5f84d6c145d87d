"""Build a model from a checkpoint: config, abstract Flax module, weights streamed into its state.

The model is created under ``nnx.eval_shape`` (no random init), then every parameter is read
from the checkpoint, converted to the serving dtype on the host and placed on the device. The
graph definition and the parameter state are returned separately: the jitted step merges them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm
from transformers import AutoConfig

from jaxserve.models import ModelConfig, model_class, model_config_from_hf
from jaxserve.weights.gguf_reader import open_gguf
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
    dtype: jnp.dtype  # parameters (and KV cache)
    compute_dtype: jnp.dtype  # activations
    load_seconds: float


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
    hf = AutoConfig.from_pretrained(str(source.path), local_files_only=True)
    stored = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return model_config_from_hf(hf), (str(stored).replace("torch.", "") if stored else None)


def _our_path(hf: str) -> tuple[tuple, bool] | None:
    """(state path, transpose?) for an HF parameter name; None for names we do not use."""
    parts = hf.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if not parts or parts[-1] not in ("weight", "bias"):
        return None
    kind = parts[-1]
    mod = parts[:-1]
    if mod == ["embed_tokens"]:
        return ("embed_tokens", "embedding"), False
    path = tuple(int(p) if p.isdigit() else p for p in mod)
    is_norm = mod[-1].endswith("norm")
    if kind == "bias":
        return (*path, "bias"), False
    return (*path, "weight" if is_norm else "kernel"), not is_norm


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


def load_model(
    source: ModelSource,
    cfg: ModelConfig,
    dtype: jnp.dtype,
    *,
    backend: str = "reference",
    compute_dtype: jnp.dtype | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Read every parameter of ``source`` into a fresh model of ``cfg``'s architecture.

    ``compute_dtype`` (default: ``dtype``) is the activation dtype.
    """
    t0 = time.perf_counter()
    cls = model_class(cfg.architecture)
    compute_dtype = jnp.dtype(compute_dtype or dtype)
    abstract = nnx.eval_shape(
        lambda: cls(cfg, dtype=dtype, backend=backend, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, abstract_state = nnx.split(abstract)
    wanted = {
        _path_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    if source.kind == "gguf":
        ckpt = open_gguf(source.path)
        tensors: Iterator[tuple[str, np.ndarray]] = ckpt.iter_tensors(cfg)
        total = ckpt.num_tensors()
    else:
        files = safetensors_files(source.path)
        tensors = iter_safetensors(files)
        total = count_tensors(files)
    np_dtype = np.dtype(dtype)
    loaded: dict[tuple, jax.Array] = {}
    for name, arr in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", disable=not progress):
        mapped = _our_path(name)
        if mapped is None or mapped[0] not in wanted or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            logger.debug("skipping checkpoint tensor %s", name)
            continue
        targets = [mapped]
        if cfg.tie_word_embeddings and mapped[0] == ("embed_tokens", "embedding"):
            targets.append((("lm_head", "kernel"), True))  # the tied head, stored transposed
        for path, transpose in targets:
            a = arr.T if transpose else arr
            expect = wanted[path]
            if tuple(a.shape) != tuple(expect.shape):
                raise ValueError(f"{name}: checkpoint shape {a.shape} != model shape {expect.shape}")
            loaded[path] = jax.device_put(np.ascontiguousarray(a.astype(np_dtype, copy=False)))
    missing = sorted(".".join(map(str, p)) for p in wanted if p not in loaded)
    if missing:
        raise ValueError(f"checkpoint is missing parameters: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    state = jax.tree_util.tree_map_with_path(lambda p, _: loaded[_path_key(p)], abstract_state)
    return LoadedModel(cfg, graphdef, state, dtype, compute_dtype, time.perf_counter() - t0)
