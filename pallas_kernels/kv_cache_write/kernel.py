"""Pallas body of the KV-cache write: one program per new token stores its [K, H] key and value
rows at ``slot = page * S + offset`` of the aliased (in place) page arrays."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl


def _kernel(slot_ref, k_ref, v_ref, k_pages_in, v_pages_in, k_pages_ref, v_pages_ref) -> None:
    # slot_ref: i32[T] (whole array); k_ref, v_ref: [K, H] this token's rows;
    # k_pages_ref, v_pages_ref: [P, S, K, H] aliased to the inputs (never read here).
    del k_pages_in, v_pages_in
    page_size = k_pages_ref.shape[1]
    slot = slot_ref[pl.program_id(0)]
    page, offset = slot // page_size, slot % page_size
    k_pages_ref[page, offset] = k_ref[...]
    v_pages_ref[page, offset] = v_ref[...]


def build_call(num_tokens: int, pages_shape: tuple[int, ...], dtype, *, interpret: bool):
    """Grid (T,): operands (slot mapping i32[T], k [T, K, H], v [T, K, H], k pages, v pages)."""
    _, _, k, h = pages_shape
    full = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        _kernel,
        grid=(num_tokens,),
        in_specs=[
            pl.BlockSpec((num_tokens,), lambda t: (0,)),
            pl.BlockSpec((None, k, h), lambda t: (t, 0, 0)),
            pl.BlockSpec((None, k, h), lambda t: (t, 0, 0)),
            full,
            full,
        ],
        out_specs=[full, full],
        out_shape=[jax.ShapeDtypeStruct(pages_shape, dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        name="kv_cache_write",
    )
