"""Build a model from a checkpoint: config, abstract Flax module, weights streamed into its state.

The model is built abstractly (``weights/abstract_model.py``); every parameter is then read from
the checkpoint (safetensors slice by slice, GGUF dequantized, orbax restored per shard, or dummy
random values), converted to the serving dtype on the host and placed on its devices. The graph
definition and the parameter state are returned separately: the jitted step merges them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm
from transformers import AutoConfig

from jaxserve.models import ModelConfig, model_config_from_hf
from jaxserve.models.qkv_layout import QKV_PARTS, QKVLayout
from jaxserve.sharding import ShardingPlan, make_plan
from jaxserve.weights.abstract_model import (
    AbstractModel,
    LoadedModel,
    StatePath,
    abstract_loaded_model,
    build_abstract,
    path_name,
)
from jaxserve.weights.dummy import dummy_params
from jaxserve.weights.gguf_reader import open_gguf
from jaxserve.weights.orbax_checkpoint import read_orbax_config, restore_orbax
from jaxserve.weights.safetensors_reader import count_tensors, iter_safetensors, safetensors_files
from jaxserve.weights.source import ModelSource

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
__all__ = ["DTYPES", "LoadedModel", "abstract_loaded_model", "load_model", "read_model_config", "resolve_dtype"]


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


def _rows(index: tuple, shape: tuple[int, ...]) -> list[slice]:
    """A device shard's index as unit-step slices."""
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError("strided shard slices are not supported")
        out.append(slice(start, stop))
    return out


def _read_fused(parts: list, layout: QKVLayout, shape: tuple[int, ...], index: tuple) -> np.ndarray:
    """Slice ``index`` of the fused q/k/v parameter (kernel [F, D] or bias [F]) from the
    checkpoint's q, k and v tensors, in the layout ``models/qkv_layout.py`` defines."""
    rows, *rest = _rows(index, shape)
    pieces = []
    for part, src in layout.checkpoint_rows(rows):
        lo, hi = int(src.min()), int(src.max()) + 1  # one contiguous read; repeated KV rows re-indexed
        pieces.append(np.asarray(parts[part][(slice(lo, hi), *rest)])[src - lo])
    return np.concatenate(pieces, axis=0)


def _read_plain(tensor: Any, shape: tuple[int, ...], index: tuple) -> np.ndarray:
    """Slice ``index`` of a checkpoint tensor (our layout is the checkpoint's)."""
    return np.asarray(tensor[tuple(_rows(index, shape))])


class _Placer:
    """Streams checkpoint tensors into ``abstract``'s leaves, each device shard read on its own."""

    def __init__(self, abstract: AbstractModel) -> None:
        self.abstract = abstract
        self.np_dtype = np.dtype(abstract.dtype)
        self.loaded: dict[StatePath, jax.Array] = {}
        self.staged: dict[StatePath, dict[str, Any]] = {}  # fused q/k/v parts waiting for their siblings

    def place(self, path: StatePath, read_block: Callable[[tuple], np.ndarray]) -> None:
        """Make parameter ``path`` a (possibly sharded) array; ``read_block(shape, index)`` reads each device's
        block of the checkpoint tensor, converted to the model dtype."""
        shape = tuple(self.abstract.leaves[path].shape)

        def read(index: tuple) -> np.ndarray:
            return np.ascontiguousarray(read_block(shape, index).astype(self.np_dtype, copy=False))

        self.loaded[path] = jax.make_array_from_callback(shape, self.abstract.plan.param(path_name(path)), read)

    def add(self, name: str, tensor: Any) -> None:
        """One checkpoint tensor (HF name); unknown names are skipped."""
        a, cfg = self.abstract, self.abstract.checkpoint_config
        mapped = _our_path(name)
        if mapped is not None and mapped[-2] in QKV_PARTS and (*mapped[:-2], "qkv_proj", mapped[-1]) in a.leaves:
            self._add_qkv_part(name, mapped, tensor)
            return
        if mapped is None or mapped not in a.leaves or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            logger.debug("skipping checkpoint tensor %s", name)
            return
        targets = [mapped]
        if cfg.tie_word_embeddings and mapped == ("embed_tokens", "embedding"):
            targets.append(("lm_head", "kernel"))  # the tied head (vocab-parallel under TP)
        for path in targets:
            expect = tuple(a.leaves[path].shape)
            if tuple(tensor.shape) != expect:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit model shape {expect}")
            if path != mapped and a.plan.tp == 1:
                self.loaded[path] = self.loaded[mapped]  # one device: the tied head shares the embedding's buffer
                continue
            self.place(path, functools.partial(_read_plain, tensor))

    def _add_qkv_part(self, name: str, mapped: StatePath, tensor: Any) -> None:
        fused = (*mapped[:-2], "qkv_proj", mapped[-1])
        parts = self.staged.setdefault(fused, {})
        parts[mapped[-2]] = tensor
        if len(parts) < 3:
            return
        del self.staged[fused]
        layout = self.abstract.qkv_layout
        got = tuple(tuple(parts[k].shape) for k in QKV_PARTS)
        expect = tuple(self.abstract.leaves[fused].shape)
        if tuple(g[0] for g in got) != layout.checkpoint_widths or any(g[1:] != expect[1:] for g in got):
            raise ValueError(f"{name}: q/k/v shapes {got} do not fit the fused parameter {expect}")
        self.place(fused, functools.partial(_read_fused, [parts[k] for k in QKV_PARTS], layout))

    def result(self, seconds: float) -> LoadedModel:
        """The loaded model; ValueError naming the parameters no checkpoint tensor filled."""
        missing = sorted(".".join(map(str, p)) for p in self.abstract.leaves if p not in self.loaded)
        if missing:
            raise ValueError(f"checkpoint is missing parameters: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
        return self.abstract.finish(self.loaded.__getitem__, seconds)


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
    ``dummy``: no tensor is read; every parameter is random (``weights/dummy.py``).
    """
    t0 = time.perf_counter()
    plan = plan or make_plan(cfg, 1)
    abstract = build_abstract(cfg, plan, dtype, backend=backend, compute_dtype=jnp.dtype(compute_dtype or dtype))
    if dummy:
        return abstract.finish(dummy_params(abstract).__getitem__, time.perf_counter() - t0)
    if source.kind == "orbax":
        return restore_orbax(source.path, abstract)
    if source.kind == "gguf":
        ckpt = open_gguf(source.path)
        tensors: Iterator[tuple[str, Any]] = ckpt.iter_tensors(cfg)
        total = ckpt.num_tensors()
    else:
        files = safetensors_files(source.path)
        tensors = iter_safetensors(files)
        total = count_tensors(files)
    placer = _Placer(abstract)
    for name, tensor in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", disable=not progress):
        placer.add(name, tensor)
    return placer.result(time.perf_counter() - t0)
