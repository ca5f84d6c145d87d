"""GGUF loading: llama.cpp's q/k row permutation undone, names mapped, dequantization applied."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.models.attention import build_host_metadata
from jaxserve.weights.gguf_reader import hf_name, unpermute_qk
from jaxserve.weights.loader import load_model, read_model_config
from jaxserve.weights.source import resolve_model_source
from tests.helpers import llama_cpp_permute, write_gguf_from_hf


def _prefill_logits(path, ids: np.ndarray) -> np.ndarray:
    src = resolve_model_source(str(path))
    cfg, _ = read_model_config(src)
    loaded = load_model(src, cfg, jnp.float32, progress=False)
    t = len(ids)
    pages = -(-t // 16)
    meta = build_host_metadata([t], [t], [list(range(1, pages + 1))], 16, num_tokens=t, num_seqs=1,
                               table_width=pages)
    caches = [(jnp.zeros((pages + 1, 16, cfg.num_kv_heads, cfg.head_dim)),) * 2 for _ in range(cfg.num_layers)]

    @jax.jit
    def forward(state, caches, meta):  # metadata as an argument: traced, as in the engine's step
        return nnx.merge(loaded.graphdef, state)(ids, jnp.arange(t), caches, meta, jnp.arange(t))[0]

    return np.asarray(forward(loaded.state, caches, meta))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 6), 6), w)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)
    b = np.arange(48, dtype=np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(b, 3), 3), b)


def test_name_map():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


@pytest.mark.hf_reference
@pytest.mark.parametrize("arch,gguf_arch", [("llama", "llama"), ("qwen2", "qwen2")])
def test_gguf_logits_match_hf(arch, gguf_arch, hf_checkpoints, tmp_path):
    import torch

    _, hf_model = hf_checkpoints(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf_from_hf(hf_model, path, gguf_arch)
    ids = np.random.RandomState(3).randint(0, 320, 33).astype(np.int32)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)[None].long()).logits[0].numpy()
    got = _prefill_logits(path, ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.hf_reference
def test_quantized_gguf_is_dequantized(hf_checkpoints, tmp_path):
    _, hf_model = hf_checkpoints("llama")
    path = tmp_path / "q8.gguf"
    write_gguf_from_hf(hf_model, path, "llama", qtype="Q8_0")
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    ids = np.random.RandomState(4).randint(0, 320, 17).astype(np.int32)
    import torch

    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)[None].long()).logits[0].numpy()
    got = _prefill_logits(path, ids)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05  # 8-bit weights: close to the float model, but not identical
