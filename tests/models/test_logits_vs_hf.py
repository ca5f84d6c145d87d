"""Each architecture's logits equal Hugging Face transformers' (float32, tiny random checkpoints).

Checked twice per architecture: a whole-prompt prefill, and token-by-token decode through the
paged cache (pages deliberately out of order), both against HF's full forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.models.attention import build_host_metadata
from jaxserve.weights.loader import load_model, read_model_config
from jaxserve.weights.source import resolve_model_source

pytestmark = pytest.mark.hf_reference

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
PAGE = 8
PAGES = [5, 2, 9, 1, 7, 3, 11, 4]  # a scrambled block table
REL_TOL = 1e-4


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].numpy()


def _load(directory):
    """(config, jitted forward(caches, tokens, positions, meta, logits_indices))."""
    src = resolve_model_source(str(directory))
    cfg, _ = read_model_config(src)
    loaded = load_model(src, cfg, jnp.float32, progress=False)

    @jax.jit
    def forward(state, caches, tokens, positions, meta, logits_indices):
        return nnx.merge(loaded.graphdef, state)(tokens, positions, caches, meta, logits_indices)

    return cfg, functools.partial(forward, loaded.state)


def _empty_cache(cfg, num_pages: int = 12):
    shape = (num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers)]


def _run(model, cfg, caches, tokens, positions, q_lens, seq_lens, tables, logits_at, *, num_tokens):
    meta = build_host_metadata(q_lens, seq_lens, tables, PAGE, num_tokens=num_tokens, num_seqs=4,
                               table_width=len(PAGES))
    tok = np.zeros(num_tokens, np.int32)
    pos = np.zeros(num_tokens, np.int32)
    tok[: len(tokens)] = tokens
    pos[: len(positions)] = positions
    idx = np.zeros(4, np.int32)
    idx[: len(logits_at)] = logits_at
    logits, caches = model(caches, tok, pos, meta, idx)
    return np.asarray(logits)[: len(logits_at)], caches


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_hf(arch, hf_checkpoints):
    directory, hf_model = hf_checkpoints(arch)
    cfg, model = _load(directory)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, 45)
    ref = _hf_logits(hf_model, ids)
    # Two copies of the prompt in one batch (different pages) must each match HF at every position.
    got_a, _ = _run(model, cfg, _empty_cache(cfg, 24), np.concatenate([ids, ids]),
                    np.concatenate([np.arange(45)] * 2), [45, 45], [45, 45],
                    [PAGES[:6], [12, 13, 14, 15, 16, 17]], [44, 89], num_tokens=96)
    scale = np.abs(ref).max()
    assert np.abs(got_a[0] - ref[44]).max() <= REL_TOL * scale
    assert np.abs(got_a[1] - ref[44]).max() <= REL_TOL * scale
    all_pos, _ = _run(model, cfg, _empty_cache(cfg), ids, np.arange(45), [45], [45], [PAGES[:6]],
                      [0, 17, 31, 44], num_tokens=48)
    assert np.abs(all_pos - ref[[0, 17, 31, 44]]).max() <= REL_TOL * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_through_paged_cache_matches_hf(arch, hf_checkpoints):
    directory, hf_model = hf_checkpoints(arch)
    cfg, model = _load(directory)
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, 40)
    ref = _hf_logits(hf_model, ids)
    scale = np.abs(ref).max()
    caches = _empty_cache(cfg)
    prefix = 13  # prefill a prefix, then decode one token at a time through the cache
    out, caches = _run(model, cfg, caches, ids[:prefix], np.arange(prefix), [prefix], [prefix], [PAGES],
                       [prefix - 1], num_tokens=16)
    assert np.abs(out[0] - ref[prefix - 1]).max() <= REL_TOL * scale
    for t in range(prefix, len(ids)):
        out, caches = _run(model, cfg, caches, ids[t : t + 1], [t], [1], [t + 1], [PAGES], [0],
                           num_tokens=4)
        assert np.abs(out[0] - ref[t]).max() <= REL_TOL * scale, f"position {t}"


def test_llama3_rope_scaling_is_read(hf_checkpoints):
    cfg, _ = read_model_config(resolve_model_source(str(hf_checkpoints("llama3")[0])))
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0
    assert cfg.rope_scaling.original_max_position_embeddings == 64


def test_family_flags(hf_checkpoints):
    flags = {}
    for arch in ("qwen2", "qwen3", "llama"):
        cfg, _ = read_model_config(resolve_model_source(str(hf_checkpoints(arch)[0])))
        flags[arch] = (cfg.qkv_bias, cfg.qk_norm, cfg.tie_word_embeddings)
    assert flags == {"qwen2": (True, False, True), "qwen3": (False, True, False), "llama": (False, False, False)}
