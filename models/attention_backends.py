"""Attention backends. Each owns its KV-cache layout, its KV write and how it tiles queries; the
model hands every backend the same per-sequence ``AttentionMetadata`` (``models/attention.py``).

- ``reference``: pure jnp (the semantics), split K/V pages ``[P, S, K, H]``.
- ``cpu``: the CPU serving path: the reference's layout, attended by a C++ kernel outside XLA's loop
  emitter (an XLA FFI custom call, ``pallas_kernels/cpu_ragged_paged_attention``, built at first use);
  where it cannot be built, ``cpu_xla``: the reference, with large decode batches attended in groups
  of rows sorted by context length (``models/cpu_decode_attention.py``). ``cpu`` also names the
  layers' weight products: ``cpu_gemm`` (``models/products.py``; ``cpu_xla_dot``: the same backend
  with XLA's products, for A/B runs). Every other backend keeps ``xla`` (``jax.lax.dot_general``).
- ``pallas`` / ``pallas_interpret``: the Pallas Triton kernel (CUDA GPUs; interpreted on CPU for
  tests), the same split pages, queries tiled in rows of ``PREFILL_ROW_WIDTH`` for prefill steps.
- ``tpu``: jax's bundled TPU ragged paged attention (``jax.experimental.pallas.ops.tpu``) over its
  combined layout ``[P, S, 2K, H]`` (K and V interleaved on the head axis). No TPU has run it: it
  is verified by lowering for TPU v5e/v6e, and its layout and metadata against the bundled
  kernel's own jnp reference on CPU (``tests/models/test_attention_backends.py``).
- ``tpu_split``: the ``tpu`` layout read back into split pages and attended by the reference (CPU
  tests of the engine with the TPU cache layout).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jax.typing import DTypeLike

from jaxserve.models.cpu_decode_attention import grouped_decode_attention
from jaxserve.pallas_kernels.cpu_ragged_paged_attention import ops as cpu_attention
from jaxserve.pallas_kernels.kv_cache_write.reference import scatter_into_slots, write_kv
from jaxserve.pallas_kernels.ragged_paged_attention.metadata import RaggedMetadata, with_rows
from jaxserve.pallas_kernels.ragged_paged_attention.ops import ragged_paged_attention
from jaxserve.pallas_kernels.ragged_paged_attention.reference import ref_ragged_paged_attention

if TYPE_CHECKING:
    from jaxserve.models.attention import AttentionMetadata

KVCache = Any  # one layer's cache: a backend-defined pytree of arrays
PREFILL_ROW_WIDTH = 16  # queries per row in prefill steps (Triton's tl.dot wants >= 16 rows)


@dataclasses.dataclass(frozen=True)
class SplitPagesBackend:
    """K and V in separate pages ``[P, S, K, H]``; attention over query rows (the reference or the kernel)."""

    name: str
    kernel: str  # "reference" | "pallas"
    interpret: bool = False
    product: str = "xla"  # the layers' weight products (models/products.py)
    lm_head_product: str = "xla"

    def page_dtype(self, compute_dtype: DTypeLike, model_dtype: DTypeLike) -> jnp.dtype:
        """The cache's dtype for these activation and weight dtypes (``cache_shapes``' ``dtype``)."""
        return jnp.dtype(compute_dtype)

    def cache_shapes(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                     dtype: DTypeLike) -> KVCache:
        page = jax.ShapeDtypeStruct((num_pages, page_size, num_kv_heads, head_dim), dtype)
        return (page, page)

    def cache_specs(self, axis: str) -> KVCache:
        spec = PartitionSpec(None, None, axis, None)
        return (spec, spec)

    def rows(self, meta: AttentionMetadata, num_tokens: int) -> RaggedMetadata:
        """Decode steps: one row per token (no gather); prefill steps: rows of ``PREFILL_ROW_WIDTH``."""
        if meta.decode_only:
            num_rows, width = num_tokens, 1
        else:
            width = PREFILL_ROW_WIDTH
            num_rows = min(num_tokens, num_tokens // width + meta.seq_lens.shape[0])
        return with_rows(meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                         num_rows=num_rows, row_width=width)

    def forward(self, q_TNH: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array, cache: KVCache, meta: AttentionMetadata,
                *, sm_scale: float) -> tuple[jax.Array, KVCache]:
        """Write this step's K/V into its slots, then attend; returns (o_TNH, the updated pages)."""
        k_pages, v_pages = write_kv(cache[0], cache[1], k_TKH, v_TKH, meta.slot_mapping)
        return self.attend(q_TNH, k_pages, v_pages, meta, sm_scale=sm_scale), (k_pages, v_pages)

    def attend(self, q_TNH: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
               sm_scale: float) -> jax.Array:
        """[T, N, H] attention of this step's queries over pages that already hold its K/V."""
        rows = self.rows(meta, q_TNH.shape[0])
        if self.kernel == "reference":
            return ref_ragged_paged_attention(q_TNH, k_pages, v_pages, rows, sm_scale=sm_scale)
        return ragged_paged_attention(q_TNH, k_pages, v_pages, rows, sm_scale=sm_scale, interpret=self.interpret)


@dataclasses.dataclass(frozen=True)
class CpuBackend(SplitPagesBackend):
    """The reference's split pages, attended by the C++ kernel (``pallas_kernels/cpu_ragged_paged_attention``)
    when it builds and takes the dtypes; otherwise by XLA: decode steps of at least ``group_min_rows``
    rows in ``decode_groups`` groups sorted by context length (less KV padding gathered), the rest
    by the reference. With bf16 weights and the kernel serving, pages hold bf16 (as vLLM CPU keeps
    them: half the bytes the kernel streams) stored as their bits, uint16: XLA:CPU converts a whole
    bf16 operand to f32 around a scatter, not a uint16 one. Otherwise pages are the activation dtype."""

    decode_groups: int = 2
    group_min_rows: int = 32
    use_kernel: bool = True
    bf16_pages: bool = True

    def page_dtype(self, compute_dtype: DTypeLike, model_dtype: DTypeLike) -> jnp.dtype:
        if self.bf16_pages and jnp.dtype(model_dtype) == jnp.bfloat16 and self.use_kernel and cpu_attention.available():
            return jnp.dtype(jnp.uint16)  # bf16 bits
        return jnp.dtype(compute_dtype)

    def forward(self, q_TNH: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array, cache: KVCache, meta: AttentionMetadata,
                *, sm_scale: float) -> tuple[jax.Array, KVCache]:
        """As the split pages' forward; bf16-bit (uint16) pages get the new K/V as bf16 bits."""
        if cache[0].dtype != jnp.uint16:
            return super().forward(q_TNH, k_TKH, v_TKH, cache, meta, sm_scale=sm_scale)
        bits = lambda x: jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)  # noqa: E731
        k_pages, v_pages = write_kv(cache[0], cache[1], bits(k_TKH), bits(v_TKH), meta.slot_mapping)
        return self.attend(q_TNH, k_pages, v_pages, meta, sm_scale=sm_scale), (k_pages, v_pages)

    def attend(self, q_TNH: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
               sm_scale: float) -> jax.Array:
        """The C++ kernel when it serves these dtypes; else grouped decode attention or the reference."""
        if self.use_kernel and cpu_attention.supports(q_TNH.dtype, k_pages.dtype) and cpu_attention.available():
            return cpu_attention.cpu_ragged_paged_attention(q_TNH, k_pages, v_pages, meta.query_start_loc,
                                                            meta.seq_lens, meta.block_tables, sm_scale=sm_scale)
        t = q_TNH.shape[0]
        if not meta.decode_only or t < self.group_min_rows or t % self.decode_groups:
            return super().attend(q_TNH, k_pages, v_pages, meta, sm_scale=sm_scale)
        return grouped_decode_attention(q_TNH, k_pages, v_pages, self.rows(meta, t), sm_scale=sm_scale,
                                        groups=self.decode_groups)


@dataclasses.dataclass(frozen=True)
class TpuBackend:
    """jax's bundled TPU ragged paged attention over combined pages ``[P, S, 2K, H]`` (K at even heads)."""

    name: str
    split_reference: bool = False  # attend with the jnp reference instead (CPU tests of this layout)
    product: str = "xla"  # the layers' weight products (models/products.py)
    lm_head_product: str = "xla"

    def page_dtype(self, compute_dtype: DTypeLike, model_dtype: DTypeLike) -> jnp.dtype:
        return jnp.dtype(compute_dtype)

    def cache_shapes(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                     dtype: DTypeLike) -> KVCache:
        """One combined page array ``[P, S, 2K, H]`` (K at even heads, V at odd)."""
        if head_dim % 128 and not self.split_reference:
            raise ValueError(f"jax's bundled TPU ragged paged attention needs a head_dim that is a multiple of 128; "
                             f"this model's is {head_dim}: use --attention-backend reference")
        return jax.ShapeDtypeStruct((num_pages, page_size, 2 * num_kv_heads, head_dim), dtype)

    def cache_specs(self, axis: str) -> KVCache:
        return PartitionSpec(None, None, axis, None)  # a shard's K/V pairs stay together

    @staticmethod
    def write(kv_pages_PSCH: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array, slot_mapping_T: jax.Array) -> jax.Array:
        """Scatter the new tokens' K/V, interleaved, into their slots (the split write's scatter)."""
        _, _, c, h = kv_pages_PSCH.shape
        kv_TCH = jnp.stack([k_TKH, v_TKH], axis=2).reshape(-1, c, h)
        return scatter_into_slots(kv_pages_PSCH, kv_TCH, slot_mapping_T)

    def forward(self, q_TNH: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array, cache: KVCache, meta: AttentionMetadata,
                *, sm_scale: float) -> tuple[jax.Array, KVCache]:
        """Interleaved K/V write, then the bundled TPU kernel (or the split reference); returns (o_TNH, pages)."""
        kv_pages = self.write(cache, k_TKH, v_TKH, meta.slot_mapping)
        if self.split_reference:
            rows = SPLIT_REFERENCE.rows(meta, q_TNH.shape[0])
            o = ref_ragged_paged_attention(q_TNH, kv_pages[:, :, 0::2], kv_pages[:, :, 1::2], rows, sm_scale=sm_scale)
            return o, kv_pages
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention as tpu_rpa

        num_seqs = jnp.sum(meta.seq_lens > 0, dtype=jnp.int32)[None]  # padded sequences come last
        kv_per_block, q_per_block = self.block_sizes(q_TNH.shape[0], meta.block_tables.shape[1])
        o = tpu_rpa(q_TNH, kv_pages, meta.seq_lens, meta.block_tables, meta.query_start_loc, num_seqs,
                    sm_scale=sm_scale, num_kv_pages_per_block=kv_per_block, num_queries_per_block=q_per_block)
        return o, kv_pages

    @staticmethod
    def block_sizes(num_tokens: int, pages_per_seq: int) -> tuple[int | None, int | None]:
        """On a TPU: None (the bundled kernel's tuned table, keyed by the chip). Lowering from
        another host: the bundled kernel's untuned defaults (its table reads ``jax.devices()``)."""
        if jax.devices()[0].platform == "tpu":
            return None, None
        return min(pages_per_seq, 128), min(num_tokens, 32)


SPLIT_REFERENCE = SplitPagesBackend("reference", "reference")
BACKENDS = {
    b.name: b
    for b in (
        SPLIT_REFERENCE,
        SplitPagesBackend("pallas", "pallas"),
        SplitPagesBackend("pallas_interpret", "pallas", interpret=True),
        CpuBackend("cpu", "reference", product="cpu_gemm", lm_head_product="cpu_gemm"),
        CpuBackend("cpu_xla_dot", "reference"),  # the cpu backend with XLA's weight products (A/B)
        CpuBackend("cpu_xla", "reference", use_kernel=False),
        TpuBackend("tpu"),
        TpuBackend("tpu_split", split_reference=True),
    )
}
CONFIG_CHOICES = ("auto", "pallas", "reference")


def get_backend(name: str) -> SplitPagesBackend | TpuBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}") from None


def resolve_backend(requested: str, platform: str) -> str:
    """Map the config's ``attention_backend`` to an implementation for ``platform``.

    ``auto``: the Pallas (Triton) kernel on CUDA GPUs, jax's bundled TPU kernel on TPUs, ``cpu`` on
    CPUs, the jnp reference elsewhere. ``pallas``: the platform's kernel (interpreted off GPU/TPU,
    for tests).
    """
    if requested not in CONFIG_CHOICES:
        raise ValueError(f"attention_backend must be one of {', '.join(CONFIG_CHOICES)}, got {requested!r}")
    if requested == "reference":
        return "reference"
    if platform in ("gpu", "cuda"):
        return "pallas"
    if platform == "tpu":
        return "tpu"
    if requested == "pallas":
        return "pallas_interpret"
    return "cpu" if platform == "cpu" else "reference"
