"""Sharded checkpoints in orbax format: convert once, restore straight into the mesh's shardings.

Layout of a converted directory::

    jaxserve_checkpoint.json   format tag, the ModelConfig, the parameter dtype
    state/                     the parameter pytree (orbax), in the checkpoint's own head layout
    tokenizer files            saved with ``save_pretrained`` (chat template included)
    generation_config.json     copied when the source had one

Restoring reads, on every process, only the shards its devices hold. The fused q/k/v projection
is stored in the one-device layout ``[q | k | v]``; under tensor parallelism it is restored whole
and re-laid on device once (``models/qkv_layout.py``; KV heads repeated when fewer than devices).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
from flax import nnx

from jaxserve.models import ModelConfig
from jaxserve.models.config import RopeScaling
from jaxserve.weights.abstract_model import (
    AbstractModel,
    LoadedModel,
    is_fused_qkv,
    path_name,
    relayout_qkv,
    state_path,
)

if TYPE_CHECKING:
    from jaxserve.tokenizer import Tokenizer

FORMAT = "jaxserve-orbax-2"  # 2: linear kernels [out, in] (1 was [in, out])
MARKER = "jaxserve_checkpoint.json"


def is_orbax_checkpoint(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def read_orbax_config(directory: Path) -> tuple[ModelConfig, str]:
    """The model config and dtype name saved beside a converted checkpoint; ValueError for another format."""
    meta = json.loads((directory / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{directory}: checkpoint format {meta.get('format')!r} is not {FORMAT!r}; "
            "convert it again with scripts/convert_checkpoint.py"
        )
    raw = dict(meta["model_config"])
    raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
    raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
    return ModelConfig(**raw), meta["dtype"]


def save_orbax(directory: Path, cfg: ModelConfig, state: nnx.State, dtype: str, tokenizer: Tokenizer,
               source_dir: Path | None) -> None:
    """Write a converted checkpoint (``state`` must use the checkpoint's own head layout, TP = 1)."""
    import orbax.checkpoint as ocp

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "state", nnx.to_pure_dict(state), force=True)
    tokenizer.save_pretrained(str(directory))
    if source_dir is not None and (source_dir / "generation_config.json").is_file():
        shutil.copy(source_dir / "generation_config.json", directory / "generation_config.json")
    meta = {"format": FORMAT, "model_config": dataclasses.asdict(cfg), "dtype": dtype}
    (directory / MARKER).write_text(json.dumps(meta, indent=1))


def restore_orbax(directory: Path, abstract: AbstractModel) -> LoadedModel:
    """Restore into the shardings of ``abstract``'s plan (each process reads its own shards)."""
    import orbax.checkpoint as ocp

    t0 = time.perf_counter()
    plan, layout = abstract.plan, abstract.qkv_layout
    relaid = plan.tp > 1  # the fused q/k/v is stored one-device [q | k | v] and re-laid once on device

    def target(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        p = state_path(path)
        shape = tuple(leaf.shape)
        if is_fused_qkv(p):
            shape = (sum(layout.checkpoint_widths), *shape[1:])
        sharding = plan.replicated if relaid and is_fused_qkv(p) else plan.param(path_name(p))
        return jax.ShapeDtypeStruct(shape, abstract.dtype, sharding=sharding)

    target_tree = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(abstract.state))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / "state", target_tree)
    values = {state_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    if relaid:
        for p in [p for p in values if is_fused_qkv(p)]:
            values[p] = relayout_qkv(values[p], layout, plan.param(path_name(p)))
    return abstract.finish(values.__getitem__, time.perf_counter() - t0)
