"""Batched LoRA deltas on device: every row of a flat batch may use a different adapter (or none).

Adapter weights live in fixed slots (``engine/lora_slots.py`` writes them; this module only reads
them): per layer and target module, ``a_SRI`` (the slots' A matrices, rank padded to ``R``) and
``b_OSR`` (their B matrices, already multiplied by the adapter's scaling, output features first
like the base kernel's ``[out, in]``). Each token carries a slot index; ``-1`` is the base model.

The delta is two dense products over all slots at once (Punica's "shrink" and "expand", written
as GEMMs): ``h = x @ A_all^T`` gives ``[T, S·R]``, the columns of slots other than each token's
own are zeroed, and ``h @ B_all^T`` gives ``[T, O]``. The zeroed columns contribute exact zeros,
so a token's delta is exactly its own adapter's, and a base-model token's delta is exactly 0
(its row of ``y`` is unchanged bit for bit). Sharded like the base weight: column-parallel
targets split ``b_OSR`` by output features, row-parallel ones (o_proj, down_proj) ``a_SRI`` by
input features (GSPMD adds the same all-reduce as for the base product).

The fused q/k/v target ``qkv_proj`` stacks the q, k and v adapters: ``a_SRI`` has three ranks
(``[A_q; A_k; A_v]``), and ``b_OSR`` one: each fused output row (``models/qkv_layout.py``'s
shard-major order) holds its own part's B row, so the expand is three products (per shard: its q,
k and v rows against their rank block) and never multiplies the zeros of a block-diagonal B.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.qkv_layout import QKVLayout

TARGETS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj")  # input features split over the model axis


class LoraWeights(NamedTuple):
    """One target's slots: ``a_SRI`` [S, R, in] and ``b_OSR`` [out, S, R] (scaling folded into B;
    ``qkv_proj``: ``a_SRI`` [S, 3R, in])."""

    a_SRI: jax.Array
    b_OSR: jax.Array


class LayerLora(NamedTuple):
    """What one decoder layer needs: its targets' slot weights and each token's slot (-1: none)."""

    weights: dict[str, LoraWeights]
    slots_T: jax.Array


class LoraBatch(NamedTuple):
    """The step's LoRA inputs: one dict of target -> ``LoraWeights`` per layer, and token slots."""

    layers: tuple[dict[str, LoraWeights], ...]
    slots_T: jax.Array

    def layer(self, i: int) -> LayerLora:
        return LayerLora(self.layers[i], self.slots_T)


def _shrink(x_TI: jax.Array, w: LoraWeights, slots_T: jax.Array) -> jax.Array:
    """``[T, S, R]``: every slot's ``A x``, zero except in each token's own slot (float32)."""
    s, r, i = w.a_SRI.shape
    dims = (((1,), (1,)), ((), ()))
    a = w.a_SRI.reshape(s * r, i)
    h = jax.lax.dot_general(x_TI.astype(a.dtype), a, dims, preferred_element_type=jnp.float32)
    own = slots_T[:, None] == jnp.arange(s, dtype=slots_T.dtype)[None, :]  # [T, S]
    return jnp.where(own[:, :, None], h.reshape(-1, s, r), 0.0)


def _expand(h_TSR: jax.Array, b_OSR: jax.Array) -> jax.Array:
    """``[T, O]`` (float32): ``h`` through every slot's B (``b_OSR`` may carry leading output dims)."""
    dims = (((1, 2), (b_OSR.ndim - 2, b_OSR.ndim - 1)), ((), ()))
    return jax.lax.dot_general(h_TSR.astype(b_OSR.dtype), b_OSR, dims, preferred_element_type=jnp.float32)


def lora_delta(x_TI: jax.Array, w: LoraWeights, slots_T: jax.Array, layout: QKVLayout | None = None) -> jax.Array:
    """float32 ``[T, O]``: each token's adapter delta ``B_s (A_s x)`` for its slot ``s`` (0 for -1).

    ``layout``: the fused q/k/v target's, whose ``A`` stacks three ranks and whose ``B`` rows each
    read their own part's rank block only (three expands, one per part, per shard).
    """
    h = _shrink(x_TI, w, slots_T)
    if layout is None:
        return _expand(h, w.b_OSR)
    t, (s, r3, _) = x_TI.shape[0], w.a_SRI.shape
    h = h.reshape(t, s, 3, r3 // 3)
    nq, nk = layout.num_heads // layout.tp, layout.num_kv_heads // layout.tp  # heads per shard
    b = w.b_OSR.reshape(layout.tp, -1, s, r3 // 3)  # [shard, its q k v rows, S, R]
    cuts = np.cumsum([0, nq, nk, nk]) * layout.head_dim
    parts = [_expand(h[:, :, p], b[:, cuts[p] : cuts[p + 1]]) for p in range(3)]  # [T, shard, rows]
    return jnp.concatenate(parts, axis=-1).reshape(t, -1)


def add_lora(
    y_TO: jax.Array, x_TI: jax.Array, lora: LayerLora | None, target: str, layout: QKVLayout | None = None
) -> jax.Array:
    """``y_TO`` (a base product of ``x_TI``) plus the LoRA delta of ``target``, if it has slots.

    Computed in every step, even one without an adapter row: a ``lax.cond`` on ``any(slot >= 0)``
    per target measured slower with adapter rows on CPU (docs/benchmarks.md §13) and costs a
    predicate read per conditional on GPU.
    """
    if lora is None or target not in lora.weights:
        return y_TO
    delta = lora_delta(x_TI, lora.weights[target], lora.slots_T, layout)
    return (y_TO.astype(jnp.float32) + delta).astype(y_TO.dtype)
