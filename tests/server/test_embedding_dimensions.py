"""``dimensions`` on a Matryoshka model: truncate, then renormalise (in-process app, a hand-made encoder)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from jaxserve.config import ServeConfig
from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
from jaxserve.engine.embedding_engine import EmbedInfo
from jaxserve.server.app import build_app

HIDDEN = 8


class _CountingEncoder:
    """Vector of a sequence = [len, 1, 2, ..., HIDDEN-1] (not normalised): easy to compute by hand."""

    def __init__(self, tokenizer, matryoshka: tuple[int, ...] | None) -> None:
        self.info = EmbedInfo(tokenizer, 16, tokenizer.vocab_size, HIDDEN, matryoshka)

    def embed(self, seqs: list[list[int]]) -> np.ndarray:
        return np.array([[len(s), *range(1, HIDDEN)] for s in seqs], np.float32)


def _expected(n: int, dims: int) -> np.ndarray:
    v = np.array([n, *range(1, HIDDEN)], np.float32)[:dims]
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(str(minilm_dir))


def _client(tokenizer, matryoshka: tuple[int, ...] | None) -> TestClient:
    engine = AsyncEmbeddingEngine(lambda: _CountingEncoder(tokenizer, matryoshka))
    engine.start()
    engine.wait_ready()
    return TestClient(build_app(ServeConfig(model="m"), engine, on_shutdown=engine.shutdown))


@pytest.mark.parametrize(("matryoshka", "dims", "status"), [
    ((), 3, 200), ((), HIDDEN, 200), ((), HIDDEN + 1, 400), ((2, 4), 4, 200), ((2, 4), 3, 400), (None, 4, 400),
])
def test_dimensions(tokenizer, matryoshka, dims, status):
    with _client(tokenizer, matryoshka) as client:
        r = client.post("/v1/embeddings", json={"input": [[5, 6, 7], [9]], "dimensions": dims})
        assert r.status_code == status, r.text
        if status == 200:
            got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
            np.testing.assert_allclose(got, np.stack([_expected(3, dims), _expected(1, dims)]), rtol=1e-6)
        else:
            assert r.json()["error"]["param"] == "dimensions"
