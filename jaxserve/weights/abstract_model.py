"""The one abstract-model builder every weight source fills: safetensors/GGUF, orbax and dummy.

The Flax module is created under ``nnx.eval_shape`` (no values materialise) for the architecture
as laid out on the mesh (KV heads repeated when there are fewer than devices), and split into a
static graph and an abstract state whose leaves the sources replace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.models import ModelConfig, model_class
from jaxserve.models.qkv_layout import QKVLayout
from jaxserve.sharding import ShardingPlan, sharded_config

StatePath = tuple  # ("layers", 3, "self_attn", "qkv_proj", "kernel")


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


@dataclasses.dataclass(frozen=True)
class AbstractModel:
    """The shapes a source must fill: ``leaves`` maps each state path to its abstract leaf."""

    config: ModelConfig  # as served (sharded_config)
    checkpoint_config: ModelConfig  # as stored (KV heads not repeated)
    graphdef: nnx.GraphDef
    state: nnx.State
    leaves: dict[StatePath, Any]
    plan: ShardingPlan
    dtype: jnp.dtype
    compute_dtype: jnp.dtype

    @property
    def qkv_layout(self) -> QKVLayout:
        c = self.config
        return QKVLayout(c.num_heads, c.num_kv_heads, c.head_dim, self.plan.tp, self.plan.kv_replication)

    def finish(self, values: Callable[[StatePath], jax.Array], seconds: float) -> LoadedModel:
        """The LoadedModel whose leaf at each path is ``values(path)``."""
        state = jax.tree_util.tree_map_with_path(lambda p, _: values(state_path(p)), self.state)
        return LoadedModel(self.config, self.graphdef, state, self.dtype, self.compute_dtype, seconds, self.plan)


def build_abstract(
    cfg: ModelConfig, plan: ShardingPlan, dtype: jnp.dtype, *, backend: str, compute_dtype: jnp.dtype
) -> AbstractModel:
    """``cfg``'s model class for ``plan``'s mesh, built abstractly."""
    served = sharded_config(cfg, plan)
    cls = model_class(cfg.architecture)
    mesh = plan.mesh if plan.tp > 1 else None
    abstract = nnx.eval_shape(
        lambda: cls(served, dtype=dtype, backend=backend, compute_dtype=compute_dtype, mesh=mesh, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    leaves = {state_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    return AbstractModel(served, cfg, graphdef, state, leaves, plan, jnp.dtype(dtype), jnp.dtype(compute_dtype))


def abstract_loaded_model(
    cfg: ModelConfig, dtype: jnp.dtype, *, backend: str, compute_dtype: jnp.dtype, plan: ShardingPlan
) -> LoadedModel:
    """A ``LoadedModel`` whose parameters are shapes with their shardings (ahead-of-time lowering,
    e.g. for a platform this process has no device of; ``plan`` may hold an abstract mesh)."""
    abstract = build_abstract(cfg, plan, dtype, backend=backend, compute_dtype=compute_dtype)

    def placed(path: StatePath) -> jax.ShapeDtypeStruct:
        leaf = abstract.leaves[path]
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=plan.param(path_name(path)))

    return abstract.finish(placed, 0.0)


def state_path(path: tuple) -> StatePath:
    """A jax key path of the state (``.value`` dropped) as plain names and indices."""
    keys: list = []
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


def path_name(path: StatePath) -> str:
    """``layers/3/self_attn/qkv_proj/kernel``: the form the sharding rules match."""
    return "/".join(map(str, path))


def is_fused_qkv(path: StatePath) -> bool:
    return len(path) >= 2 and path[-2] == "qkv_proj"


def relayout_qkv(one_device: jax.Array, layout: QKVLayout, sharding: jax.sharding.Sharding) -> jax.Array:
    """A fused q/k/v leaf in the one-device ``[q | k | v]`` layout -> the served layout, placed."""
    rows = jnp.asarray(layout.fused_rows())
    return jax.jit(lambda a: jnp.take(a, rows, axis=0), out_shardings=sharding)(one_device)
