"""The one attention entry point the models call: KV write + ragged paged attention.

``backend`` is resolved once at start-up (``resolve_backend``) and stored on the model as a
static string; the Pallas kernels plug in here next to the pure-jnp reference. Under tensor
parallelism the write and the attention run per shard (``shard_map`` over the ``model`` axis):
each shard holds whole query heads and the KV heads they read, so no communication is needed.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata
from jaxserve.pallas_kernels.kv_cache_write.reference import write_kv
from jaxserve.pallas_kernels.ragged_paged_attention.ops import ragged_paged_attention
from jaxserve.pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention

BACKENDS = ("auto", "pallas", "reference")
MODEL_AXIS = "model"


def resolve_backend(requested: str, platform: str) -> str:
    """Map the config's ``attention_backend`` to an implementation for ``platform``.

    ``auto``: the Pallas (Triton) kernel on CUDA GPUs, the pure-jnp reference elsewhere. TPUs are
    a clean slot for jax's bundled TPU ragged paged attention (not wired yet: reference).
    ``pallas`` off-GPU runs the kernel in interpret mode (tests).
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "reference":
        return "reference"
    if platform in ("gpu", "cuda"):
        return "pallas"
    return "pallas_interpret" if requested == "pallas" else "reference"


def _local_attention(
    q_TNH: jax.Array,
    k_TKH: jax.Array,
    v_TKH: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    backend: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    k_pages, v_pages = write_kv(k_pages, v_pages, k_TKH, v_TKH, meta.slot_mapping)
    if backend == "reference":
        o = ref_ragged_paged_attention(q_TNH, k_pages, v_pages, meta, sm_scale=sm_scale)
    elif backend in ("pallas", "pallas_interpret"):
        o = ragged_paged_attention(
            q_TNH, k_pages, v_pages, meta, sm_scale=sm_scale, interpret=backend == "pallas_interpret"
        )
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return o, k_pages, v_pages


def paged_attention(
    q_TNH: jax.Array,
    k_TKH: jax.Array,
    v_TKH: jax.Array,
    kv_cache: tuple[jax.Array, jax.Array],
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    backend: str,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Write this step's K/V into the paged cache, then attend. Returns (o_TNH, new cache)."""

    def local(q, k, v, kp, vp, m):
        return _local_attention(q, k, v, kp, vp, m, sm_scale=sm_scale, backend=backend)

    if mesh is not None and mesh.shape[MODEL_AXIS] > 1:
        heads, pages = P(None, MODEL_AXIS, None), P(None, None, MODEL_AXIS, None)
        local = jax.shard_map(
            local, mesh=mesh, in_specs=(heads, heads, heads, pages, pages, P()),
            out_specs=(heads, pages, pages), check_vma=False,
        )
    o, k_pages, v_pages = local(q_TNH, k_TKH, v_TKH, kv_cache[0], kv_cache[1], meta)
    return o, (k_pages, v_pages)
