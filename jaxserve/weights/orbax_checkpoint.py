"""Sharded checkpoints in orbax format: convert once, restore straight into the mesh's shardings.

Layout of a converted directory::

    jaxserve_checkpoint.json   format tag, the ModelConfig, the parameter dtype
    state/                     the parameter pytree (orbax), in the checkpoint's own head layout
    tokenizer files            saved with ``save_pretrained`` (chat template included)
    generation_config.json     copied when the source had one

Restoring reads, on every process, only the shards its devices hold. The fused q/k/v projection
is stored in the one-device layout ``[q | k | v]``; under tensor parallelism it is restored whole
and laid out shard-major on device once (KV heads repeated when there are fewer than devices).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.models import ModelConfig, model_class
from jaxserve.models.config import RopeScaling
from jaxserve.sharding import ShardingPlan, make_plan, sharded_config

FORMAT = "jaxserve-orbax-2"  # 2: linear kernels [out, in] (1 was [in, out])
MARKER = "jaxserve_checkpoint.json"


def is_orbax_checkpoint(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def read_orbax_config(directory: Path) -> tuple[ModelConfig, str]:
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


def save_orbax(directory: Path, cfg: ModelConfig, state: nnx.State, dtype: str, tokenizer, source_dir: Path | None) -> None:
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


def restore_orbax(
    directory: Path,
    cfg: ModelConfig,
    dtype: jnp.dtype,
    *,
    backend: str,
    compute_dtype: jnp.dtype,
    plan: ShardingPlan | None,
):
    """Restore into ``plan``'s shardings; returns a LoadedModel."""
    import orbax.checkpoint as ocp

    from jaxserve.weights.loader import LoadedModel

    t0 = time.perf_counter()
    plan = plan or make_plan(cfg, 1)
    model_cfg = sharded_config(cfg, plan)
    cls = model_class(cfg.architecture)
    mesh = plan.mesh if plan.tp > 1 else None

    def build(c: ModelConfig):
        return nnx.eval_shape(
            lambda: cls(c, dtype=dtype, backend=backend, compute_dtype=compute_dtype, mesh=mesh, rngs=nnx.Rngs(0))
        )

    graphdef, abstract_state = nnx.split(build(model_cfg))
    stored_abstract = nnx.to_pure_dict(nnx.split(build(cfg))[1])  # checkpoint layout (KV heads unrepeated)

    def target(path, leaf):
        name = _name(path)
        sharding = plan.replicated if ("/qkv_proj/" in name and plan.tp > 1) else plan.param(name)
        return jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype), sharding=sharding)

    target_tree = jax.tree_util.tree_map_with_path(target, stored_abstract)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / "state", target_tree)
    if plan.tp > 1:
        restored = _shard_major_qkv(restored, cfg, plan)
    state = abstract_state
    nnx.replace_by_pure_dict(state, restored)
    return LoadedModel(model_cfg, graphdef, state, dtype, compute_dtype, time.perf_counter() - t0, plan)


def _name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _shard_major_qkv(tree: dict, cfg: ModelConfig, plan: ShardingPlan) -> dict:
    """``[q | k | v]`` (one device) -> ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``, KV heads repeated
    ``plan.kv_replication`` times, placed with the rule's sharding."""
    r, h, tp = plan.kv_replication, cfg.head_dim, plan.tp
    n, k = cfg.num_heads, cfg.num_kv_heads

    def relayout(a):
        a = jnp.moveaxis(a, 0, -1)  # output features (axis 0 of [F, D] and [F]) last
        lead = a.shape[:-1]
        q, kk, v = a[..., : n * h], a[..., n * h : (n + k) * h], a[..., (n + k) * h :]
        if r > 1:
            kk, v = (jnp.repeat(x.reshape(*lead, k, h), r, axis=-2).reshape(*lead, k * r * h) for x in (kk, v))
        per_shard = [x.reshape(*lead, tp, -1) for x in (q, kk, v)]
        return jnp.moveaxis(jnp.concatenate(per_shard, axis=-1).reshape(*lead, -1), -1, 0)

    def fix(path, x):
        name = _name(path)
        if "/qkv_proj/" not in name:
            return x
        return jax.jit(relayout, out_shardings=plan.param(name))(x)

    return jax.tree_util.tree_map_with_path(fix, tree)
