"""The real app over stand-in engines (no model, no jax step), with spies on what reaches them.

``FakeServing`` serves a generate model ("gen": ``FakeLLM`` of test_engine_states, one token per
step) and an embedding model ("emb") through ``build_app``, both with the real tiny byte-level BPE
tokenizer and chat template of ``tests.helpers.write_tiny_tokenizer``, so tokenization, templates
and admission are the real code. ``added`` lists the engine requests that reached the generate
engine thread, ``embedded`` the embedding batches: a request rejected at the edge adds to neither.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from fastapi import FastAPI

from jaxserve.config import ServeConfig
from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.embedding_engine import EmbedInfo
from jaxserve.engine.interface import EngineInfo
from jaxserve.server.app import build_app
from tests.helpers import write_tiny_tokenizer
from tests.server.test_engine_states import FakeLLM

MAX_MODEL_LEN = 64


class FakeEmbedder:
    """Duck-typed EmbeddingEngine: every input embeds to a ones vector of size 8."""

    def __init__(self, tok) -> None:
        self.info = EmbedInfo(tok, max_model_len=MAX_MODEL_LEN, vocab_size=len(tok), hidden_size=8,
                              matryoshka_dimensions=None)
        self.batches: list[list[list[int]]] = []

    def embed(self, seqs: list[list[int]]) -> np.ndarray:
        self.batches.append(seqs)
        return np.ones((len(seqs), 8), np.float32)


@dataclasses.dataclass
class FakeServing:
    app: FastAPI
    llm: FakeLLM
    embedder: FakeEmbedder
    engines: list

    @property
    def added(self) -> int:
        return len(self.llm.added)

    @property
    def embedded(self) -> int:
        return len(self.embedder.batches)

    def shutdown(self) -> None:
        for e in self.engines:
            e.shutdown()


def tiny_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    write_tiny_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def fake_serving(tok, llm: FakeLLM | None = None, *, log_requests: bool = False, **config) -> FakeServing:
    """Started engines and the app; ``config``: ServeConfig fields of both models (caps, api_key, ...)."""
    llm = llm or FakeLLM()
    llm.info = EngineInfo(tok, max_model_len=MAX_MODEL_LEN, vocab_size=len(tok), kv_capacity_tokens=1024,
                          default_sampling={})
    embedder = FakeEmbedder(tok)
    gen = AsyncEngine(lambda: llm, log_requests=log_requests)
    emb = AsyncEmbeddingEngine(lambda: embedder, log_requests=log_requests)
    for e in (gen, emb):
        e.start()
        e.wait_ready(10)
    configs = [ServeConfig(model="gen", enable_log_requests=log_requests, **config),
               ServeConfig(model="emb", enable_log_requests=log_requests, **config)]
    return FakeServing(build_app(configs, [gen, emb]), llm, embedder, [gen, emb])
