"""Pure-jnp KV-cache write: the semantics (an XLA scatter, in place when the pages are donated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(
    k_pages_PSKH: jax.Array,
    v_pages_PSKH: jax.Array,
    k_TKH: jax.Array,
    v_TKH: jax.Array,
    slot_mapping_T: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter the new tokens' K/V into their cache slots (in place when the pages are donated).

    Page 0 is the null block: padding tokens write there and its contents are unspecified.
    """
    p, s, k, h = k_pages_PSKH.shape
    k_flat = k_pages_PSKH.reshape(p * s, k, h)
    v_flat = v_pages_PSKH.reshape(p * s, k, h)
    k_new = k_TKH.astype(k_pages_PSKH.dtype)
    v_new = v_TKH.astype(v_pages_PSKH.dtype)
    if slot_mapping_T.shape[0] == 1:
        # XLA turns a one-row scatter into a dynamic-update-slice and then copies the whole
        # donated cache; a second write into the null block's slot 0 keeps it a scatter.
        slot_mapping_T = jnp.concatenate([slot_mapping_T, jnp.zeros((1,), slot_mapping_T.dtype)])
        k_new = jnp.concatenate([k_new, jnp.zeros_like(k_new)])
        v_new = jnp.concatenate([v_new, jnp.zeros_like(v_new)])
    k_flat = k_flat.at[slot_mapping_T].set(k_new, mode="promise_in_bounds")
    v_flat = v_flat.at[slot_mapping_T].set(v_new, mode="promise_in_bounds")
    return k_flat.reshape(p, s, k, h), v_flat.reshape(p, s, k, h)
