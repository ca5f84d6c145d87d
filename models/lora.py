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

The fused q/k/v target ``qkv_proj`` stacks the q, k and v adapters: ``R`` is three ranks
(``[A_q; A_k; A_v]``) and ``b_OSR`` is block diagonal, its rows in ``models/qkv_layout.py``'s
fused, shard-major order (built by the slot store).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TARGETS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj")  # input features split over the model axis


class LoraWeights(NamedTuple):
    """One target's slots: ``a_SRI`` [S, R, in] and ``b_OSR`` [out, S, R] (scaling folded into B)."""

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


def lora_delta(x_TI: jax.Array, w: LoraWeights, slots_T: jax.Array) -> jax.Array:
    """float32 ``[T, O]``: each token's adapter delta ``B_s (A_s x)`` for its slot ``s`` (0 for -1)."""
    s, r, i = w.a_SRI.shape
    a = w.a_SRI.reshape(s * r, i)
    b = w.b_OSR.reshape(w.b_OSR.shape[0], s * r)
    dims = (((1,), (1,)), ((), ()))
    h = jax.lax.dot_general(x_TI.astype(a.dtype), a, dims, preferred_element_type=jnp.float32)
    own = slots_T[:, None] == jnp.arange(s, dtype=slots_T.dtype)[None, :]  # [T, S]
    h = jnp.where(own[:, :, None], h.reshape(-1, s, r), 0.0).reshape(-1, s * r)
    return jax.lax.dot_general(h.astype(b.dtype), b, dims, preferred_element_type=jnp.float32)


def add_lora(y_TO: jax.Array, x_TI: jax.Array, lora: LayerLora | None, target: str) -> jax.Array:
    """``y_TO`` (a base product of ``x_TI``) plus the LoRA delta of ``target``, if it has slots."""
    if lora is None or target not in lora.weights:
        return y_TO
    return (y_TO.astype(jnp.float32) + lora_delta(x_TI, lora.weights[target], lora.slots_T)).astype(y_TO.dtype)
