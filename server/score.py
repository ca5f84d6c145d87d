"""vLLM's ``POST /score`` for an embedding model: the cosine of each text_1 embedding with its text_2's.

Pairing as vLLM's: one text_1 against N text_2 (1:N), or N against N (pairwise); anything else is a
400. The single text_1 of a 1:N request is embedded once; both sides go to the engine together.
"""

from __future__ import annotations

import asyncio

import numpy as np

from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
from jaxserve.server.embeddings import embed_ids, input_token_ids
from jaxserve.server.errors import OpenAIError
from jaxserve.server.offload import off_loop
from jaxserve.server.protocol import EmbeddingRequest, ScoreData, ScoreRequest, ScoreResponse, UsageInfo


def score_inputs(req: ScoreRequest) -> tuple[list[str], list[str]]:
    """Both sides as lists, checked: non-empty, no empty text, 1:N or N:N."""
    sides = ([req.text_1] if isinstance(req.text_1, str) else req.text_1,
             [req.text_2] if isinstance(req.text_2, str) else req.text_2)
    for param, texts in zip(("text_1", "text_2"), sides):
        if not texts:
            raise OpenAIError(400, f"{param} is empty; at least one text must be given", param=param)
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:
            raise OpenAIError(400, f"{param} {empty} is an empty string", param=param)
    if len(sides[0]) > 1 and len(sides[0]) != len(sides[1]):
        raise OpenAIError(400, f"text_1 has {len(sides[0])} texts and text_2 {len(sides[1])}: "
                          "the lengths must be 1:1, 1:N or N:N", param="text_1")
    return sides


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``a`` (one row broadcast, or as many as ``b``) with ``b``."""
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=-1)


async def create_score(req: ScoreRequest, engine: AsyncEmbeddingEngine, model_name: str) -> dict:
    """The response body: one score per text_2, in its order (400 for any bad input)."""
    info = engine.info
    sides = score_inputs(req)
    seqs = [await off_loop(input_token_ids, EmbeddingRequest(input=t, truncate_prompt_tokens=req.truncate_prompt_tokens),
                           info) for t in sides]
    v1, v2 = await asyncio.gather(embed_ids(seqs[0], engine, "text_1"), embed_ids(seqs[1], engine, "text_2"))
    tokens = sum(len(s) for side in seqs for s in side)
    return ScoreResponse(
        data=[ScoreData(index=i, score=float(s)) for i, s in enumerate(cosines(v1, v2))],
        model=model_name, usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens),
    ).model_dump()
