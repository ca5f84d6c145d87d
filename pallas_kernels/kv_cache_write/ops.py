"""Public KV-cache write op: validation shared with the reference, then the Pallas kernel."""

from __future__ import annotations

import functools

import jax

from jaxserve.pallas_kernels.kv_cache_write import kernel as _kernel


def validate_inputs(k_pages_PSKH: jax.Array, v_pages_PSKH: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array,
                    slot_mapping_T: jax.Array) -> None:
    if k_pages_PSKH.ndim != 4 or k_pages_PSKH.shape != v_pages_PSKH.shape:
        raise ValueError(f"k/v pages must both be [P, S, K, H], got {k_pages_PSKH.shape} and {v_pages_PSKH.shape}")
    _, _, k, h = k_pages_PSKH.shape
    if k_TKH.shape != v_TKH.shape or k_TKH.shape[1:] != (k, h):
        raise ValueError(f"new k/v must be [T, {k}, {h}], got {k_TKH.shape} and {v_TKH.shape}")
    if slot_mapping_T.shape != (k_TKH.shape[0],):
        raise ValueError(f"slot_mapping must be [T={k_TKH.shape[0]}], got {slot_mapping_T.shape}")


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnums=(0, 1))
def write_kv(
    k_pages_PSKH: jax.Array,
    v_pages_PSKH: jax.Array,
    k_TKH: jax.Array,
    v_TKH: jax.Array,
    slot_mapping_T: jax.Array,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as ``reference.write_kv``: pages [P, S, K, H] (donated, updated in place),
    new k/v [T, K, H], slots i32[T] (page * S + offset; padding tokens point into page 0)."""
    validate_inputs(k_pages_PSKH, v_pages_PSKH, k_TKH, v_TKH, slot_mapping_T)
    dtype = k_pages_PSKH.dtype
    call = _kernel.build_call(k_TKH.shape[0], k_pages_PSKH.shape, dtype, interpret=interpret)
    k_pages, v_pages = call(slot_mapping_T, k_TKH.astype(dtype), v_TKH.astype(dtype), k_pages_PSKH, v_pages_PSKH)
    return k_pages, v_pages
