"""The Pallas kernels lower for CUDA (Triton) and TPU (Mosaic) over the engine's shape families,
on this CPU-only machine; and a construct Triton cannot lower is caught."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jaxserve.models.attention import build_host_metadata as model_metadata
from jaxserve.models.attention_backends import get_backend
from jaxserve.pallas_kernels.ragged_paged_attention.metadata import build_host_metadata
from jaxserve.pallas_kernels.ragged_paged_attention.ops import ragged_paged_attention
from tests.lowering.helpers import KERNEL_CALL, lower_text

# (query heads, KV heads, head dim): Qwen2.5-0.5B, Qwen2.5-7B, Llama 3 8B
HEADS = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-7b": (28, 4, 128), "llama3-8b": (32, 8, 128)}
BATCHES = {"decode": ([1] * 8, [100, 37, 1, 64, 250, 16, 17, 9]), "mixed": ([1, 30, 1, 7, 64], [70, 30, 100, 19, 64])}


def _case(heads: str, page: int, batch: str):
    n, k, h = HEADS[heads]
    q_lens, kv_lens = BATCHES[batch]
    tables, nxt = [], 1
    for kv in kv_lens:
        tables.append(list(range(nxt, nxt + -(-kv // page))))
        nxt += len(tables[-1])
    t = sum(q_lens) + 3
    width = 1 if batch == "decode" else 16
    rows = t if width == 1 else sum(-(-q // width) for q in q_lens) + 1
    meta = build_host_metadata(q_lens, kv_lens, tables, page, num_tokens=t, num_seqs=len(q_lens) + 1,
                               table_width=max(map(len, tables)) + 1, num_rows=rows, row_width=width)
    q = jax.ShapeDtypeStruct((t, n, h), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((nxt + 1, page, k, h), jnp.bfloat16)
    return q, pages, meta, h


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("heads", list(HEADS))
def test_ragged_paged_attention_lowers_to_triton(heads, page, batch):
    q, pages, meta, h = _case(heads, page, batch)
    fn = functools.partial(ragged_paged_attention, sm_scale=h**-0.5)
    text = lower_text(fn, (q, pages, pages, meta), "h100")
    assert KERNEL_CALL["cuda"] in text


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("heads", ["qwen2.5-7b", "llama3-8b"])
@pytest.mark.parametrize("device", ["v5e", "v6e"])
def test_tpu_backend_lowers_to_mosaic(device, heads, batch):
    n, k, h = HEADS[heads]
    q_lens, kv_lens = BATCHES[batch]
    tables, nxt = [], 1
    for kv in kv_lens:
        tables.append(list(range(nxt, nxt + -(-kv // 16))))
        nxt += len(tables[-1])
    t = sum(q_lens) + 3
    meta = model_metadata(q_lens, kv_lens, tables, 16, num_tokens=t, num_seqs=len(q_lens) + 1,
                          table_width=max(map(len, tables)) + 1)
    backend = get_backend("tpu")
    cache = backend.cache_shapes(nxt + 1, 16, k, h, jnp.bfloat16)
    new = jax.ShapeDtypeStruct((t, k, h), jnp.bfloat16)
    fn = functools.partial(backend.forward, sm_scale=h**-0.5)
    text = lower_text(fn, (jax.ShapeDtypeStruct((t, n, h), jnp.bfloat16), new, new, cache, meta), device)
    assert KERNEL_CALL["tpu"] in text


def _sorting_kernel(x_ref, o_ref):
    o_ref[...] = jax.lax.sort(x_ref[...], dimension=0)


def test_an_unsupported_construct_is_caught():
    """A sort inside a kernel runs in interpret mode but has no Triton lowering: lowering must fail."""
    x = jnp.asarray(np.random.RandomState(0).randn(16, 16), jnp.float32)
    call = lambda interpret: pl.pallas_call(  # noqa: E731
        _sorting_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)
    np.testing.assert_array_equal(np.asarray(call(True)(x)), np.sort(np.asarray(x), axis=0))
    with pytest.raises(Exception, match="(?i)sort"):
        lower_text(call(False), (x,), "h100")
