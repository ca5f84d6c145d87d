"""``--load-format dummy``: random parameters, each created directly in its shards.

Kernels and embeddings ~ N(0, 0.02²), norm weights 1, biases 0 (like vLLM's dummy load format,
for benchmarks: the step's cost does not depend on the values). Values are drawn per checkpoint
tensor and then laid out like a real load: the fused q/k/v is drawn in its one-device ``[q | k | v]``
shape and re-laid by ``models/qkv_layout.py``, so every tensor-parallel size serves the same model.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.weights.abstract_model import AbstractModel, StatePath, is_fused_qkv, path_name, relayout_qkv

_HEAD, _EMBEDDING = ("lm_head", "kernel"), ("embed_tokens", "embedding")


@functools.cache
def _init_fn(kind: str, shape: tuple[int, ...], dtype: jnp.dtype, sharding: jax.sharding.Sharding) -> Any:
    """One compiled initializer per (kind, shape, dtype, sharding): layers share them."""
    if kind == "weight":
        return jax.jit(lambda k: jnp.ones(shape, dtype), out_shardings=sharding)
    if kind == "bias":
        return jax.jit(lambda k: jnp.zeros(shape, dtype), out_shardings=sharding)
    return jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype), out_shardings=sharding)


def dummy_params(abstract: AbstractModel) -> dict[StatePath, jax.Array]:
    """Random values for every leaf of ``abstract``, keyed by state path."""
    key, plan, layout = jax.random.key(0), abstract.plan, abstract.qkv_layout
    tied = abstract.checkpoint_config.tie_word_embeddings
    relaid = layout.tp > 1 or layout.kv_replication > 1
    made = {}
    for i, (path, leaf) in enumerate(abstract.leaves.items()):
        if tied and path == _HEAD:
            continue
        shape, sharding = tuple(leaf.shape), plan.param(path_name(path))
        if is_fused_qkv(path) and relaid:
            one_device = (sum(layout.checkpoint_widths), *shape[1:])
            drawn = _init_fn(path[-1], one_device, leaf.dtype, plan.replicated)(jax.random.fold_in(key, i))
            made[path] = relayout_qkv(drawn, layout, sharding)
        else:
            made[path] = _init_fn(path[-1], shape, leaf.dtype, sharding)(jax.random.fold_in(key, i))
    if tied:  # as when loading: the embedding's values (its very buffer on one device)
        emb = made[_EMBEDDING]
        made[_HEAD] = emb if plan.tp == 1 else jax.jit(lambda x: x, out_shardings=plan.param("lm_head/kernel"))(emb)
    return made
