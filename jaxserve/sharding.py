"""Tensor parallelism: the device mesh and the table that maps parameter paths to shardings.

The model code is unchanged by sharding: parameters are placed with the ``NamedSharding`` the
rules below give their path, the KV cache is split by KV heads, and XLA (GSPMD) inserts the
collectives. Only attention runs explicitly per shard (``shard_map`` in ``models/attention.py``).

Layout (Megatron style): the fused q/k/v projection (features laid out shard-major, so each
device gets whole heads of all three) and gate/up are split by output features,
o_proj and down_proj by input features (XLA adds one all-reduce after each), the LM head by
vocabulary; the embedding table and the norms are replicated. Kernels are [out, in] (the
checkpoints' layout), so "output features" is axis 0.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.models.config import ModelConfig

DATA_AXIS = "data"
MODEL_AXIS = "model"

# (regex on the "/"-joined parameter path, PartitionSpec); first match wins.
SHARDING_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed_tokens/embedding$", P(None, None)),
    (r"^layers/\d+/self_attn/qkv_proj/kernel$", P(MODEL_AXIS, None)),
    (r"^layers/\d+/self_attn/qkv_proj/bias$", P(MODEL_AXIS)),
    (r"^layers/\d+/self_attn/o_proj/kernel$", P(None, MODEL_AXIS)),
    (r"^layers/\d+/mlp/(gate|up)_proj/kernel$", P(MODEL_AXIS, None)),
    (r"^layers/\d+/mlp/(gate|up)_proj/bias$", P(MODEL_AXIS)),
    (r"^layers/\d+/mlp/down_proj/kernel$", P(None, MODEL_AXIS)),
    (r"^layers/\d+/(self_attn/o_proj|mlp/down_proj)/bias$", P(None)),
    (r"(^|/)(input_layernorm|post_attention_layernorm|norm|q_norm|k_norm)/weight$", P(None)),
    (r"^lm_head/kernel$", P(MODEL_AXIS, None)),
)


class TensorParallelError(ValueError):
    """The requested tensor-parallel size does not fit the model or the devices."""


def spec_for(path: str) -> P:
    """The PartitionSpec the rules give a parameter path (``layers/3/mlp/up_proj/kernel``)."""
    for pattern, spec in SHARDING_RULES:
        if re.search(pattern, path):
            return spec
    raise KeyError(f"no sharding rule for parameter {path!r}")


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus how the model's heads are laid out on it."""

    mesh: Mesh
    kv_replication: int  # each checkpoint KV head is repeated this many times (when K < TP)

    @property
    def tp(self) -> int:
        return self.mesh.shape[MODEL_AXIS]

    def param(self, path: str) -> NamedSharding:
        return NamedSharding(self.mesh, spec_for(path))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())


def kv_replication(cfg: ModelConfig, tp: int) -> int:
    """How often each KV head must be repeated so every shard holds whole KV heads."""
    if cfg.num_kv_heads % tp == 0:
        return 1
    if tp % cfg.num_kv_heads == 0:
        return tp // cfg.num_kv_heads
    raise TensorParallelError(
        f"tensor_parallel_size {tp} does not fit num_key_value_heads {cfg.num_kv_heads}: one must divide the other"
    )


def check_tensor_parallel(cfg: ModelConfig, tp: int, num_devices: int) -> int:
    """Validate ``tp`` against the model and devices; returns the KV replication factor."""
    if tp < 1:
        raise TensorParallelError(f"tensor_parallel_size must be >= 1, got {tp}")
    if tp > num_devices:
        raise TensorParallelError(
            f"tensor_parallel_size {tp} needs {tp} devices, but only {num_devices} are available"
        )
    for name, value in (
        ("num_attention_heads", cfg.num_heads),
        ("intermediate_size", cfg.intermediate_size),
        ("vocab_size", cfg.vocab_size),
    ):
        if value % tp:
            raise TensorParallelError(f"tensor_parallel_size {tp} does not divide the model's {name} ({value})")
    return kv_replication(cfg, tp)


def make_plan(cfg: ModelConfig, tp: int, dp: int = 1, devices: list | None = None) -> ShardingPlan:
    """A ``(data, model)`` mesh over the first ``dp * tp`` devices."""
    devices = list(devices if devices is not None else jax.devices())
    r = check_tensor_parallel(cfg, tp, len(devices) // max(dp, 1))
    if dp * tp > len(devices):
        raise TensorParallelError(f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} devices")
    mesh = Mesh(np.array(devices[: dp * tp]).reshape(dp, tp), (DATA_AXIS, MODEL_AXIS))
    return ShardingPlan(mesh, r)


def sharded_config(cfg: ModelConfig, plan: ShardingPlan) -> ModelConfig:
    """The architecture as laid out on the mesh: KV heads repeated when there are fewer than TP."""
    if plan.kv_replication == 1:
        return cfg
    return dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * plan.kv_replication)
