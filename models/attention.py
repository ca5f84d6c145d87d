"""The one attention entry point the models call, and the per-sequence metadata it takes.

What the model sees is per sequence: each new token's cache slot, query offsets, KV lengths and
block tables (``AttentionMetadata``), plus one static fact about the step, ``decode_only`` (every
sequence has at most one new token). How queries are tiled for a kernel is the backend's business
(``models/attention_backends.py``): the engine's compile key holds no tile width.

Under tensor parallelism the KV write and the attention run per shard (``shard_map`` over the
``model`` axis): each shard holds whole query heads and the KV heads they read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxserve.models.attention_backends import KVCache, get_backend
from jaxserve.pallas_kernels.ragged_paged_attention.metadata import pack_sequences

MODEL_AXIS = "model"


@dataclasses.dataclass
class AttentionMetadata:
    """One step's ragged batch over the paged cache (a pytree; ``decode_only`` is static).

    Shapes: T tokens, B sequences, W pages per sequence. Padded sequences have no queries and
    ``seq_lens == 0``; padded tokens write into page 0, which the block manager never hands out.
    """

    slot_mapping: jax.Array  # i32[T]   cache slot (page * page_size + offset) of each new token
    query_start_loc: jax.Array  # i32[B+1] cumulative query offsets into the flat tokens
    seq_lens: jax.Array  # i32[B]   KV length of each sequence after this step
    block_tables: jax.Array  # i32[B, W] page ids of each sequence (unused entries: 0)
    decode_only: bool  # every sequence has at most one query (decode buckets: T == B)


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=["slot_mapping", "query_start_loc", "seq_lens", "block_tables"],
    meta_fields=["decode_only"],
)


def build_host_metadata(
    q_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], page_size: int, *,
    num_tokens: int, num_seqs: int, table_width: int, decode_only: bool | None = None,
) -> AttentionMetadata:
    """Host (numpy) metadata for sequences whose ``q_lens[b]`` new tokens end at ``seq_lens[b]``.

    ``decode_only`` defaults to whether every sequence has at most one query.
    """
    return host_metadata_and_positions(q_lens, seq_lens, block_tables, page_size, num_tokens=num_tokens,
                                       num_seqs=num_seqs, table_width=table_width, decode_only=decode_only)[0]


def host_metadata_and_positions(
    q_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], page_size: int, *,
    num_tokens: int, num_seqs: int, table_width: int, decode_only: bool | None = None,
) -> tuple[AttentionMetadata, np.ndarray]:
    """``build_host_metadata`` and each new token's position (i32[T], 0 for padding), computed
    once by ``pack_sequences`` for both (the model's RoPE positions are the KV slots' positions)."""
    if decode_only is None:
        decode_only = all(q <= 1 for q in q_lens)
    elif decode_only and any(q > 1 for q in q_lens):
        raise ValueError("decode_only metadata cannot hold a sequence with more than one query")
    *arrays, positions = pack_sequences(q_lens, seq_lens, block_tables, page_size, num_tokens=num_tokens,
                                        num_seqs=num_seqs, table_width=table_width)
    return AttentionMetadata(*arrays, decode_only=decode_only), positions


def abstract_metadata(num_tokens: int, num_seqs: int, table_width: int, decode_only: bool) -> AttentionMetadata:
    """The shapes of a step's metadata, for ahead-of-time lowering."""
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    return AttentionMetadata(i32(num_tokens), i32(num_seqs + 1), i32(num_seqs), i32(num_seqs, table_width),
                             decode_only)


def paged_attention(
    q_TNH: jax.Array,
    k_TKH: jax.Array,
    v_TKH: jax.Array,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    backend: str,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """Write this step's K/V into the paged cache, then attend. Returns (o_TNH, new cache)."""
    impl = get_backend(backend)

    def local(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache,
              m: AttentionMetadata) -> tuple[jax.Array, KVCache]:
        return impl.forward(q, k, v, cache, m, sm_scale=sm_scale)

    if mesh is not None and mesh.shape[MODEL_AXIS] > 1:
        heads = jax.sharding.PartitionSpec(None, MODEL_AXIS, None)
        cache_specs = impl.cache_specs(MODEL_AXIS)
        local = jax.shard_map(
            local, mesh=mesh, in_specs=(heads, heads, heads, cache_specs, jax.sharding.PartitionSpec()),
            out_specs=(heads, cache_specs), check_vma=False,
        )
    return local(q_TNH, k_TKH, v_TKH, kv_cache, meta)


def dense_causal_attention(
    q_BLNH: jax.Array, k_BLKH: jax.Array, v_BLKH: jax.Array, mask_BL: jax.Array, *, sm_scale: float
) -> jax.Array:
    """Cache-free causal attention over right-padded rows (decoder embedders): query i sees keys
    ``j <= i`` with ``mask_BL[b, j]``; GQA by repeating each KV head. Softmax in float32."""
    groups = q_BLNH.shape[2] // k_BLKH.shape[2]
    k = jnp.repeat(k_BLKH, groups, axis=2)
    v = jnp.repeat(v_BLKH, groups, axis=2)
    scores = jnp.einsum("bqnh,bknh->bnqk", q_BLNH, k, preferred_element_type=jnp.float32) * sm_scale
    n = q_BLNH.shape[1]
    allowed = jnp.tril(jnp.ones((n, n), bool))[None, None] & mask_BL[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)
