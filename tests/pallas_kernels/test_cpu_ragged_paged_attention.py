"""The CPU ragged paged attention kernel (C++, XLA FFI) against the dense oracle and the jnp
reference, the ``cpu`` backend serving it in the engine, and its fallback when it cannot be built."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.attention import build_host_metadata as model_metadata
from jaxserve.models.attention_backends import BACKENDS, SPLIT_REFERENCE
from jaxserve.pallas_kernels.cpu_ffi_build import cache_dir
from jaxserve.pallas_kernels.cpu_ragged_paged_attention import build
from jaxserve.pallas_kernels.cpu_ragged_paged_attention.ops import cpu_ragged_paged_attention
from jaxserve.sampling_params import SamplingParams
from tests.engine.engine_helpers import make_engine
from tests.pallas_kernels.helpers import MIXES, check_against_dense, failing_kernel_build

# Besides the shared mixes: prefill blocks of 16 queries and KV tiles of 32 tokens cut mid-page,
# a chunk over a long cached prefix, decode rows beside it.
MIXES = {**MIXES, "tiles_and_blocks": ([40, 1, 17, 1, 33], [140, 77, 50, 33, 33])}
SHAPES = [(6, 2, 32), (8, 8, 64), (12, 2, 24)]  # (query heads, KV heads, head dim): GQA 3, MHA, H % 16 != 0


def _kernel(q_dtype, bits: bool = False):
    """``impl`` for ``check_against_dense``: the kernel on the per-sequence metadata, queries in
    ``q_dtype``; ``bits``: bf16 pages handed over as their bits (uint16, the cpu backend's cache)."""

    @functools.partial(jax.jit, static_argnames="sm_scale")
    def impl(q, k_pages, v_pages, meta, *, sm_scale):
        if bits:
            k_pages, v_pages = (jax.lax.bitcast_convert_type(x, jnp.uint16) for x in (k_pages, v_pages))
        return cpu_ragged_paged_attention(q.astype(q_dtype), k_pages, v_pages, meta.query_start_loc,
                                          meta.seq_lens, meta.block_tables, sm_scale=sm_scale)

    return impl


@pytest.mark.parametrize("dtypes", ["f32", "bf16_pages", "bf16_bits_pages", "bf16"])
def test_kernel_matches_the_dense_oracle(dtypes):
    """Every mix, each with one of the head shapes and page sizes in turn; pages NaN outside the
    sequences, scattered block tables, two padded sequences, five padding tokens."""
    dtype = jnp.float32 if dtypes == "f32" else jnp.bfloat16
    # bf16_pages / bf16_bits_pages: f32 queries (the CPU default)
    impl = _kernel(jnp.bfloat16 if dtypes == "bf16" else jnp.float32, bits=dtypes == "bf16_bits_pages")
    for i, mix in enumerate(sorted(MIXES)):
        q_lens, kv_lens = MIXES[mix]
        n, k, h = SHAPES[i % len(SHAPES)]
        check_against_dense(impl, q_lens, kv_lens, n_heads=n, kv_heads=k, head_dim=h, page=(8, 16)[i % 2],
                            dtype=dtype, row_width=1, seed=i)


# Decode sequences (one query each, run_decode): contexts over many pages and of one token, beside
# a prefill chunk; 3 decode rows are split into one item per KV head, 12 are one item per sequence.
DECODE_MIXES = {
    "few_long": ([1, 9, 1, 1], [600, 40, 1, 1000]),
    "many": ([1] * 12, [577, 1, 16, 17, 33, 250, 64, 5, 129, 300, 2, 48]),
}
# (query heads, KV heads, head dim, mix, bf16-bits pages): G = 8 at head dims 64 and 128, G = 1.
DECODE_CASES = [(8, 1, 64, "few_long", False), (4, 4, 128, "many", True), (16, 2, 128, "few_long", True),
                (8, 1, 64, "many", False)]


def test_decode_items_match_the_dense_oracle():
    """The decode path (rows read in place, f32 and bf16-bits pages) on long and one-token
    contexts, G = 1 and 8, head dims 64 and 128; NaN-poisoned pages, empty sequence slots."""
    for i, (n, k, h, mix, bits) in enumerate(DECODE_CASES):
        q_lens, kv_lens = DECODE_MIXES[mix]
        check_against_dense(_kernel(jnp.float32, bits=bits), q_lens, kv_lens, n_heads=n, kv_heads=k, head_dim=h,
                            page=16, dtype=jnp.bfloat16 if bits else jnp.float32, row_width=1, seed=i, empty_slots=3)


def _backend_step(backend, seed: int, dtype=jnp.float32):
    """One mixed step (decode rows, a chunk over a cached prefix, a fresh prompt, padding) through
    ``backend.forward``: the KV write and the attention, jitted. Returns (out, caches) as numpy."""
    rng = np.random.RandomState(seed)
    n, k, h, page, pages = 6, 2, 32, 8, 64
    q_lens, seq_lens = [1, 20, 1, 7], [57, 60, 9, 7]
    perm = rng.permutation(np.arange(1, pages))
    tables, used = [], 0
    for s in seq_lens:
        tables.append(perm[used:used + -(-s // page)].tolist())
        used += len(tables[-1])
    meta = model_metadata(q_lens, seq_lens, tables, page, num_tokens=32, num_seqs=6, table_width=10)
    value = jnp.bfloat16 if dtype == jnp.uint16 else dtype  # uint16: bf16 bits (the cpu backend's pages)
    cache = tuple(jnp.asarray(rng.randn(pages, page, k, h), value) for _ in range(2))
    if dtype == jnp.uint16:
        cache = tuple(jax.lax.bitcast_convert_type(x, jnp.uint16) for x in cache)
    q, kk, vv = (jnp.asarray(rng.randn(32, m, h), jnp.float32) for m in (n, k, k))
    fwd = jax.jit(functools.partial(backend.forward, sm_scale=h**-0.5))
    o, new = fwd(q, kk.astype(value), vv.astype(value), cache, meta)
    hlo = fwd.lower(q, kk.astype(value), vv.astype(value), cache, meta).as_text()
    if dtype == jnp.uint16:
        new = tuple(jax.lax.bitcast_convert_type(x, jnp.bfloat16) for x in new)
    return np.asarray(o), tuple(np.asarray(x.astype(jnp.float32)) for x in new), hlo


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.uint16])
def test_cpu_backend_step_equals_the_reference(dtype):
    """uint16: the cpu backend's bf16-bits pages, against the reference over the same bf16 pages."""
    got, got_cache, hlo = _backend_step(BACKENDS["cpu"], 3, dtype)
    want, want_cache, _ = _backend_step(SPLIT_REFERENCE, 3, jnp.bfloat16 if dtype == jnp.uint16 else dtype)
    assert build.TARGET in hlo  # the kernel served the step
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert not np.any(got[29:])  # padding tokens
    for g, w in zip(got_cache, want_cache, strict=True):
        np.testing.assert_array_equal(g[1:], w[1:])  # the KV write is the reference's (page 0: padding)


def test_cpu_backend_pages_are_bf16_bits_with_bf16_weights_and_take_half_the_bytes():
    """The engine's cache and its sizing: with bf16 weights and the kernel, uint16 (bf16 bits)
    pages; with f32 weights or the XLA fallback, the activation dtype. A KV block then takes half
    the f32 bytes."""
    from types import SimpleNamespace

    from jaxserve.engine.model_runner import kv_block_bytes

    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    assert BACKENDS["cpu"].page_dtype(f32, bf16) == jnp.uint16
    assert BACKENDS["cpu"].page_dtype(f32, f32) == f32
    assert BACKENDS["cpu_xla"].page_dtype(f32, bf16) == f32
    config = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=64)
    loaded = lambda dtype: SimpleNamespace(config=config, compute_dtype=f32, dtype=dtype)  # noqa: E731
    f32_bytes = 3 * 2 * 16 * 2 * 64 * 4  # layers x (K, V) x tokens x KV heads x head dim x 4 B
    assert kv_block_bytes(loaded(bf16), 16, "reference") == kv_block_bytes(loaded(f32), 16, "cpu") == f32_bytes
    assert kv_block_bytes(loaded(bf16), 16, "cpu") == f32_bytes // 2


@pytest.fixture
def failing_build(tmp_path, monkeypatch):
    yield from failing_kernel_build(build, tmp_path, monkeypatch)


def test_failed_build_falls_back_to_xla(failing_build, caplog):
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        got, _, hlo = _backend_step(BACKENDS["cpu"], 4)
        assert build.load() is False  # tried once: no second build, no second warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using XLA's attention instead" in warnings[0].getMessage()
    assert build.TARGET not in hlo and "custom_call" not in hlo
    want, _, _ = _backend_step(BACKENDS["cpu_xla"], 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not list(cache_dir().glob("*.so*"))  # no half-written library left behind


def test_random_model_greedy_tokens_equal_the_reference_backend(tmp_path_factory):
    """A tiny Qwen2 with random weights (``--load-format dummy``): the cpu backend's greedy tokens
    are the reference backend's, prompts of 3-90 tokens chunked over 16-token steps. (The engine
    suite runs on the cpu backend too: the lookback model's exact outputs under chunking, prefix
    caching and preemption, ``tests/engine``.)"""
    from tests.helpers import hf_config, write_tiny_tokenizer

    d = tmp_path_factory.mktemp("random_qwen2")
    cfg = hf_config("qwen2")
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(d)
    write_tiny_tokenizer(d)
    rng = np.random.RandomState(2)
    prompts = [rng.randint(3, 300, size=n).tolist() for n in (3, 90, 41, 17)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = {b: make_engine(d, load_format="dummy", attention_backend=b, max_num_seqs=2, max_num_batched_tokens=16,
                           max_model_len=128).generate(prompts, params)
            for b in ("auto", "reference")}
    assert outs["auto"] == outs["reference"]
    assert len({tuple(o) for o in outs["auto"]}) == len(prompts)  # the prompts are told apart
