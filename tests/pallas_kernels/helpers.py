"""Shared checks for ragged paged attention implementations against a dense per-sequence oracle.

Unused pages (and unused slots of partly used pages) are NaN, so any read outside a sequence's
KV shows up in the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels.ragged_paged_attention.metadata import build_host_metadata
from jaxserve.pallas_kernels.ragged_paged_attention.reference import ref_attention_dense

# Kernels compile for real on a CUDA GPU (the GPU check runs this suite there), interpret elsewhere.
INTERPRET = jax.default_backend() != "gpu"

# Absolute and relative tolerance per dtype (outputs are O(1): softmax-weighted N(0, 1) values).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}

MIXES = {
    "decode_only": ([1, 1, 1, 1], [7, 16, 33, 1]),
    "prefill_only": ([20, 5], [20, 5]),
    "mixed": ([1, 12, 1, 3], [40, 12, 9, 3]),
    "chunk_after_cached_prefix": ([10, 1], [42, 64]),
    "page_multiples": ([16, 1], [32, 16]),
    "length_one": ([1], [1]),
}


def check_against_dense(
    impl: Callable, q_lens, kv_lens, *, n_heads, kv_heads, head_dim, page, dtype, row_width,
    sliding_window=None, soft_cap=None, seed=0, empty_slots: int = 2,
) -> None:
    """Run ``impl(q, k_pages, v_pages, meta, sm_scale=..., ...)`` on a NaN-poisoned paged cache
    (plus ``empty_slots`` padded sequences) and compare every sequence with the dense oracle."""
    rng = np.random.RandomState(seed)
    num_pages = 1 + sum(-(-k // page) for k in kv_lens) + 3
    k_pages = np.full((num_pages, page, kv_heads, head_dim), np.nan, np.float32)
    v_pages = np.full_like(k_pages, np.nan)
    free = list(rng.permutation(np.arange(1, num_pages)))
    tables, dense = [], []
    for kv in kv_lens:
        pages = [int(free.pop()) for _ in range(-(-kv // page))]
        tables.append(pages)
        k = rng.randn(kv, kv_heads, head_dim).astype(np.float32)
        v = rng.randn(kv, kv_heads, head_dim).astype(np.float32)
        for pos in range(kv):
            k_pages[pages[pos // page], pos % page] = k[pos]
            v_pages[pages[pos // page], pos % page] = v[pos]
        dense.append((k, v))
    total = sum(q_lens)
    num_tokens = total + 5  # padding tokens
    q = rng.randn(num_tokens, n_heads, head_dim).astype(np.float32)
    rows = sum(-(-q_ // row_width) for q_ in q_lens) + 2
    if row_width == 1:
        rows = num_tokens  # decode layout: one row per token
    meta = build_host_metadata(
        q_lens, kv_lens, tables, page, num_tokens=num_tokens, num_seqs=len(q_lens) + empty_slots,
        table_width=max(len(t) for t in tables) + 1, num_rows=rows, row_width=row_width,
    )
    extra = {k: v for k, v in (("sliding_window", sliding_window), ("soft_cap", soft_cap)) if v is not None}
    got = impl(jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), meta,
               sm_scale=head_dim**-0.5, **extra)
    got = np.asarray(jnp.asarray(got).astype(jnp.float32))
    start = 0
    for (k, v), ql, kv in zip(dense, q_lens, kv_lens, strict=True):
        want = ref_attention_dense(
            jnp.asarray(q[start : start + ql], dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.arange(kv - ql, kv), jnp.arange(kv), sm_scale=head_dim**-0.5, **extra,
        )
        np.testing.assert_allclose(got[start : start + ql], np.asarray(want.astype(jnp.float32)),
                                   atol=TOL[dtype], rtol=TOL[dtype])
        start += ql
    assert np.all(got[total:] == 0), "padding tokens must produce zeros"
    assert np.isfinite(got).all()


def failing_kernel_build(build: Any, tmp_path: Path, monkeypatch: Any) -> Iterator[None]:
    """Body of a fixture: a compiler that reports a version and fails every build, and an empty kernel
    cache for ``build`` (a kernel's build module); the outcome is forgotten before and after, so
    later tests build (or load) the kernel again."""
    cxx = tmp_path / "broken-c++"
    cxx.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo broken 1.0; exit 0; }\necho "error: no" >&2; exit 1\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("JAXSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    build.reset()
    yield
    build.reset()
