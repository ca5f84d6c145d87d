"""``POST /v1/embeddings`` and vLLM's ``POST /pooling``: inputs -> token ids -> the embedding engine ->
the response.

Inputs are a string, a list of strings, token ids or a list of token-id lists. ``truncate_prompt_tokens``
(vLLM's; -1 = the model's max length) truncates text with the tokenizer (its truncation side,
special tokens kept, as sentence-transformers does) and keeps the last k ids of token-id inputs
(as vLLM does); without it, an input over the max length is a 400 stating both numbers.
``dimensions`` truncates each vector then renormalises it, only for Matryoshka models.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from jaxserve.engine.async_embedding import AsyncEmbeddingEngine
from jaxserve.engine.embedding_engine import EmbedInfo
from jaxserve.engine.interface import EngineDeadError
from jaxserve.sampling_params import SamplingParamError
from jaxserve.server.errors import OpenAIError
from jaxserve.server.offload import off_loop
from jaxserve.server.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    UsageInfo,
)


def _truncation(req: EmbeddingRequest, info: EmbedInfo) -> int | None:
    k = req.truncate_prompt_tokens
    if k is None:
        return None
    if k == -1:
        return info.max_model_len
    if k < 1 or k > info.max_model_len:
        raise OpenAIError(400, f"truncate_prompt_tokens must be -1 or between 1 and the model's maximum length "
                          f"{info.max_model_len}, got {k}", param="truncate_prompt_tokens")
    return k


def input_token_ids(req: EmbeddingRequest, info: EmbedInfo) -> list[list[int]]:
    """Token ids of every input (text tokenized, token ids as given), truncated if asked."""
    inputs: Any = req.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise OpenAIError(400, "input is empty", param="input")
    empty = next((i for i, x in enumerate(inputs) if len(x) == 0), None)
    if empty is not None:
        raise OpenAIError(400, f"input {empty} is empty", param="input")
    k = _truncation(req, info)
    if isinstance(inputs[0], str):
        kwargs = {"truncation": True, "max_length": k} if k is not None else {}
        return info.tokenizer(list(inputs), add_special_tokens=req.add_special_tokens, **kwargs)["input_ids"]
    return [list(ids[-k:]) if k is not None else list(ids) for ids in inputs]


def _check_dimensions(dimensions: int | None, info: EmbedInfo) -> None:
    if dimensions is None:
        return
    allowed = info.matryoshka_dimensions
    if allowed is None:
        raise OpenAIError(400, "dimensions: this model does not declare Matryoshka support "
                          "(is_matryoshka / matryoshka_dimensions in its config), so its vectors cannot be shortened",
                          param="dimensions")
    if not 1 <= dimensions <= info.hidden_size or (allowed and dimensions not in allowed):
        choices = ", ".join(map(str, allowed)) if allowed else f"1 to {info.hidden_size}"
        raise OpenAIError(400, f"dimensions {dimensions} is not supported by this model (allowed: {choices})",
                          param="dimensions")


def _encode(vec: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return vec.tolist()


async def embed_ids(seqs: list[list[int]], engine: AsyncEmbeddingEngine, param: str = "input") -> np.ndarray:
    """The engine's vectors ``[len(seqs), hidden]`` (400 naming ``param`` for a bad input, 503 if it cannot serve)."""
    try:
        return await engine.embed(seqs)
    except SamplingParamError as e:
        raise OpenAIError(400, str(e) if param == "input" else f"{param}: {e}", param=param) from None
    except EngineDeadError as e:
        raise OpenAIError(503, str(e)) from None


async def _vectors(req: EmbeddingRequest, engine: AsyncEmbeddingEngine) -> tuple[np.ndarray, int]:
    """The request's vectors (shortened for ``dimensions``) and its prompt token count."""
    info = engine.info
    _check_dimensions(req.dimensions, info)
    seqs = await off_loop(input_token_ids, req, info)
    vectors = await embed_ids(seqs, engine)
    if req.dimensions is not None:
        vectors = vectors[:, : req.dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return vectors, sum(map(len, seqs))


async def create_embedding(req: EmbeddingRequest, engine: AsyncEmbeddingEngine, model_name: str) -> dict:
    """The ``/v1/embeddings`` response body (400 for any bad input, 503 if the engine cannot serve)."""
    vectors, tokens = await _vectors(req, engine)
    return EmbeddingResponse(
        data=[EmbeddingData(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)],
        model=model_name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    ).model_dump()


async def create_pooling(req: PoolingRequest, engine: AsyncEmbeddingEngine, model_name: str) -> dict:
    """vLLM's ``/pooling`` response body: the same vectors as ``/v1/embeddings`` in vLLM's pooling shape."""
    vectors, tokens = await _vectors(req, engine)
    return PoolingResponse(
        data=[PoolingData(index=i, data=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)],
        model=model_name, usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens),
    ).model_dump()
