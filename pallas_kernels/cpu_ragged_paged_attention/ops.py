"""The jax wrapper of the CPU ragged paged attention kernel (an XLA FFI custom call, ``kernel.cc``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels.cpu_ragged_paged_attention import build

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
PAGE_DTYPES = (*DTYPES, jnp.dtype(jnp.uint16))  # uint16: bf16 values stored as their bits


def supports(q_dtype: jnp.dtype | type, kv_dtype: jnp.dtype | type) -> bool:
    """Whether the kernel takes these dtypes (q and output: f32 or bf16; K/V pages: f32, bf16 or
    bf16 bits as uint16)."""
    return jnp.dtype(q_dtype) in DTYPES and jnp.dtype(kv_dtype) in PAGE_DTYPES


def available() -> bool:
    """Build and register the kernel if needed; False (after one warning) when it cannot be built."""
    return build.load()


def cpu_ragged_paged_attention(
    q_TNH: jax.Array, k_pages_PSKH: jax.Array, v_pages_PSKH: jax.Array, query_start_loc: jax.Array,
    seq_lens: jax.Array, block_tables: jax.Array, *, sm_scale: float,
) -> jax.Array:
    """``ref_ragged_paged_attention`` over per-sequence metadata, on the CPU (no query rows needed).

    q_TNH [T, N, H]; pages [P, S, K, H] holding this step's K/V; query_start_loc i32[B+1],
    seq_lens i32[B], block_tables i32[B, W]. Returns [T, N, H] in q's dtype, zero for padding
    tokens. Raises RuntimeError when the kernel is unavailable (check ``available()`` first).
    """
    if not build.load():
        raise RuntimeError("the CPU attention kernel could not be built (see the warning logged)")
    if not supports(q_TNH.dtype, k_pages_PSKH.dtype) or k_pages_PSKH.dtype != v_pages_PSKH.dtype:
        raise ValueError(f"unsupported dtypes: q {q_TNH.dtype}, pages {k_pages_PSKH.dtype}/{v_pages_PSKH.dtype}")
    t, n, h = q_TNH.shape
    if k_pages_PSKH.ndim != 4 or k_pages_PSKH.shape != v_pages_PSKH.shape or k_pages_PSKH.shape[3] != h:
        raise ValueError(f"pages must be [P, S, K, H={h}], got {k_pages_PSKH.shape} and {v_pages_PSKH.shape}")
    if n % k_pages_PSKH.shape[2]:
        raise ValueError(f"query heads ({n}) must be a multiple of KV heads ({k_pages_PSKH.shape[2]})")
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    call = jax.ffi.ffi_call(build.TARGET, jax.ShapeDtypeStruct(q_TNH.shape, q_TNH.dtype))
    return call(q_TNH, k_pages_PSKH, v_pages_PSKH, i32(query_start_loc), i32(seq_lens), i32(block_tables),
                sm_scale=np.float32(sm_scale))
