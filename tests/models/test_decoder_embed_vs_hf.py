"""A decoder (tiny random Qwen3) served as an embedder equals HF transformers' hidden states pooled the
same way (last token or mean, then L2-normalised), batched with mixed lengths and one by one (float32).
Last-token pooling runs on the paged engine (prompts over 16 tokens chunked across steps), mean
pooling on the cache-free bucketed path."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.engine.test_compilation import _Compiles

LENGTHS = (1, 5, 9, 16, 17, 30, 3)  # both length buckets (16, 32), several rows padded differently
MAX_ABS = 2e-5


def _engine(directory: Path, pooling: str, max_len: int = 32, tp: int = 1):
    from jaxserve.config import ServeConfig
    from jaxserve.engine.pooling_engine import build_embedding_engine

    return build_embedding_engine(ServeConfig(
        model=str(directory), task="embed", pooling=pooling, dtype="float32", max_model_len=max_len, max_num_seqs=2,
        max_num_batched_tokens=64, kv_cache_memory_gib=1 / 256, compilation_cache_dir="", tensor_parallel_size=tp))


@pytest.fixture(scope="module")
def qwen3(hf_checkpoints):
    return hf_checkpoints("qwen3")


@pytest.fixture(scope="module")
def token_ids(qwen3) -> list[list[int]]:
    rng = np.random.default_rng(0)
    vocab = qwen3[1].config.vocab_size
    return [rng.integers(3, vocab, n).tolist() for n in LENGTHS]


def _reference(torch_model, token_ids: list[list[int]], pooling: str) -> np.ndarray:
    """HF's final hidden states of each unpadded sequence, pooled, then normalised."""
    import torch

    out = []
    with torch.no_grad():
        for ids in token_ids:
            h = torch_model.model(torch.tensor([ids])).last_hidden_state[0].numpy()
            v = h[-1] if pooling == "last" else h.mean(0)
            out.append(v / np.linalg.norm(v))
    return np.stack(out)


@pytest.mark.hf_reference
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_embedder_equals_hf(qwen3, qwen3_paged_embedder, token_ids, pooling):
    from jaxserve.engine.embedding_engine import EmbeddingEngine
    from jaxserve.engine.pooling_engine import PoolingEngine

    directory, torch_model = qwen3
    if pooling == "last":
        engine = qwen3_paged_embedder
        assert isinstance(engine, PoolingEngine) and engine.pooling.normalize
        assert engine.config.max_num_batched_tokens < max(LENGTHS)  # the longest prompts are chunked
    else:
        engine = _engine(directory, pooling)
        assert isinstance(engine, EmbeddingEngine) and engine.model.pooling.normalize
        assert engine.info.max_model_len == 32 and len(engine._compiled) == 4  # (1|2) x (16|32)
    ref = _reference(torch_model, token_ids, pooling)
    with _Compiles() as compiles:
        batched = engine.embed(token_ids)
        one_by_one = np.stack([engine.embed([t])[0] for t in token_ids])
    assert compiles == []  # every shape was compiled at start-up
    assert np.abs(batched - ref).max() <= MAX_ABS
    assert np.abs(one_by_one - ref).max() <= MAX_ABS
    # Paged: one by one, each input finds its blocks cached by the batch (its last token recomputed).
    np.testing.assert_allclose(one_by_one, batched, rtol=0, atol=1e-6)
    other = _reference(torch_model, token_ids, "mean" if pooling == "last" else "last")
    assert np.abs(batched - other)[1:].max() > 1e-2  # the twin: the other pooling is told apart


def test_decoder_pooling_from_modules_json(tmp_path):
    """--pooling auto reads a sentence-transformers pipeline if the checkpoint has one; else last, normalised."""
    from jaxserve.config import ServeConfig
    from jaxserve.engine.embedders import decoder_pooling
    from jaxserve.models.bert import PoolingConfig
    from jaxserve.weights.source import ModelSource

    source = ModelSource("hf", tmp_path)
    auto = ServeConfig(model=str(tmp_path), task="embed")
    assert decoder_pooling(auto, source) == (PoolingConfig("lasttoken", True), None)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert decoder_pooling(auto, source) == (PoolingConfig("mean", False), 128)
    explicit = ServeConfig(model=str(tmp_path), task="embed", pooling="last")
    assert decoder_pooling(explicit, source) == (PoolingConfig("lasttoken", True), None)


@pytest.mark.hf_reference
@pytest.mark.parametrize(("arch", "tp"), [("llama", 2), ("qwen2", 1)])
def test_other_families_last_token(hf_checkpoints, token_ids, arch, tp):
    """Llama (no q/k norm; sharded over 2 devices) and Qwen2 (q/k/v bias, tied embeddings) through the
    same paged path."""
    directory, torch_model = hf_checkpoints(arch)
    short = [t for t in token_ids if len(t) <= 16]
    engine = _engine(directory, "last", max_len=16, tp=tp)
    assert engine.runner.loaded.plan.tp == tp
    assert type(engine).__name__ == "PoolingEngine"  # build_embedding_engine's choice for last-token pooling
    assert np.abs(engine.embed(short) - _reference(torch_model, short, "last")).max() <= MAX_ABS


@pytest.mark.hf_reference
def test_served_with_runner_pooling(qwen3, token_ids, tmp_path_factory):
    """vLLM's --runner pooling on a decoder: /v1/embeddings answers HF's last-token vectors (the
    default pooling); a chat request is a 400 naming the task."""
    from tests.server.conftest import start_server

    directory, torch_model = qwen3
    server = start_server(tmp_path_factory, "qwen3-embed", [
        "--model", str(directory), "--runner", "pooling", "--served-model-name", "qemb", "--max-model-len", "32",
        "--max-num-seqs", "2", "--max-num-batched-tokens", "64", "--dtype", "float32", "--kv-cache-memory-gib", "0.01"])
    try:
        resp = httpx.post(f"{server.base_url}/v1/embeddings", json={"model": "qemb", "input": token_ids}, timeout=60)
        assert resp.status_code == 200, resp.text
        ours = np.array([d["embedding"] for d in resp.json()["data"]], np.float32)
        assert np.abs(ours - _reference(torch_model, token_ids, "last")).max() <= MAX_ABS
        assert resp.json()["usage"]["prompt_tokens"] == sum(LENGTHS)
        chat = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                          json={"model": "qemb", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "embed" in chat.text
    finally:
        server.stop()
