"""vLLM's ``/score`` and ``/pooling`` on the MiniLM server, checked against ``/v1/embeddings`` vectors."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.helpers import SENTENCES

LONG = " ".join(["words"] * 100)  # 102 tokens with [CLS]/[SEP]: over the server's 64


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": "minilm", **body}, timeout=60)


@pytest.fixture(scope="module")
def vectors(minilm_server) -> dict[str, np.ndarray]:
    """Each sentence's /v1/embeddings vector (float64 for the reference cosines)."""
    r = _post(minilm_server, "/v1/embeddings", {"input": SENTENCES})
    assert r.status_code == 200, r.text
    return {s: np.array(d["embedding"], np.float64) for s, d in zip(SENTENCES, r.json()["data"], strict=True)}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _scores(resp: httpx.Response) -> list[float]:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["model"] == "minilm" and body["id"].startswith("score-")
    assert isinstance(body["created"], int)
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(body["data"]))]
    return [d["score"] for d in body["data"]]


def test_score_one_to_n_and_n_to_n_equal_embedding_cosines(minilm_server, vectors, minilm_dir):
    query, docs = SENTENCES[1], SENTENCES[2:]
    want = [_cos(vectors[query], vectors[d]) for d in docs]
    for text_1 in (query, [query]):  # 1:N, the one text_1 as a string or a list of one
        r = _post(minilm_server, "/score", {"text_1": text_1, "text_2": docs})
        np.testing.assert_allclose(_scores(r), want, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    n_tokens = sum(len(tok(s)["input_ids"]) for s in [query, *docs])  # text_1 embedded once
    assert r.json()["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "completion_tokens": 0}
    pairs_1, pairs_2 = SENTENCES[:3], SENTENCES[3:6]  # N:N, pairwise
    r = _post(minilm_server, "/v1/score", {"text_1": pairs_1, "text_2": pairs_2})
    np.testing.assert_allclose(_scores(r), [_cos(vectors[a], vectors[b]) for a, b in zip(pairs_1, pairs_2)],
                               atol=1e-5)
    r = _post(minilm_server, "/score", {"text_1": SENTENCES[0], "text_2": SENTENCES[0]})  # 1:1, strings
    np.testing.assert_allclose(_scores(r), [1.0], atol=1e-5)


def test_pooling_returns_the_embedding_vectors(minilm_server, vectors):
    docs = SENTENCES[:3]
    for fmt in ("float", "base64"):
        r = _post(minilm_server, "/pooling", {"input": docs, "encoding_format": fmt})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "minilm" and body["id"].startswith("pool-")
        assert [(d["index"], d["object"]) for d in body["data"]] == [(0, "pooling"), (1, "pooling"), (2, "pooling")]
        got = [np.frombuffer(base64.b64decode(d["data"]), "<f4") if fmt == "base64" else d["data"]
               for d in body["data"]]
        np.testing.assert_allclose(np.array(got), np.array([vectors[s] for s in docs]), atol=1e-6)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_1", "must be 1:1, 1:N or N:N"),
    ("/score", {"text_1": [], "text_2": "a"}, "text_1", "text_1 is empty"),
    ("/score", {"text_1": "a", "text_2": ["b", ""]}, "text_2", "text_2 1 is an empty string"),
    ("/score", {"text_1": "a", "text_2": ["b", LONG]}, "text_2", "input 1 has 102 tokens, over this model's maximum"),
    ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "between 1"),
    ("/score", {"text_1": "a", "text_2": "b", "label_token_ids": [1]}, "label_token_ids", "unknown field"),
    ("/score", {"text_1": "a"}, "text_2", ""),
    ("/pooling", {"input": ["a", ""]}, "input", "input 1 is empty"),
    ("/pooling", {"input": "a", "dimensions": 8}, "dimensions", "does not declare Matryoshka"),
])
def test_score_and_pooling_bad_requests_are_400(minilm_server, path, body, param, words):
    r = _post(minilm_server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


def test_score_truncation(minilm_server, minilm_dir):
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    cut = tok.decode(tok(LONG, truncation=True, max_length=64)["input_ids"][1:-1])
    r = _post(minilm_server, "/score", {"text_1": "words", "text_2": [LONG, cut], "truncate_prompt_tokens": -1})
    first, second = _scores(r)
    assert first == pytest.approx(second, abs=1e-5)
