"""Pure-jnp KV-cache write: the semantics (an XLA scatter, in place when the pages are donated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scatter_into_slots(pages_PS_X: jax.Array, new_T_X: jax.Array, slot_mapping_T: jax.Array) -> jax.Array:
    """Write row ``t`` of ``new_T_X`` into flat slot ``slot_mapping_T[t]`` of ``pages`` ([P, S, ...]).

    XLA turns a one-row scatter into a dynamic-update-slice and then copies the whole donated
    cache; a second write into the null block's slot 0 keeps it a scatter.
    """
    p, s = pages_PS_X.shape[:2]
    new = new_T_X.astype(pages_PS_X.dtype)
    if slot_mapping_T.shape[0] == 1:
        slot_mapping_T = jnp.concatenate([slot_mapping_T, jnp.zeros((1,), slot_mapping_T.dtype)])
        new = jnp.concatenate([new, jnp.zeros_like(new)])
    flat = pages_PS_X.reshape(p * s, *pages_PS_X.shape[2:])
    return flat.at[slot_mapping_T].set(new, mode="promise_in_bounds").reshape(pages_PS_X.shape)


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
    return (scatter_into_slots(k_pages_PSKH, k_TKH, slot_mapping_T),
            scatter_into_slots(v_pages_PSKH, v_TKH, slot_mapping_T))
