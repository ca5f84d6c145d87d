"""``POST /v1/completions``: text completions for one or many prompts, streaming or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.server.errors import OpenAIError, error_body
from jaxserve.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    random_id,
)
from jaxserve.server.requests import check_unsupported, completion_max_tokens, completion_prompts, sampling_params
from jaxserve.server.sse import DONE, sse
from jaxserve.server.streams import check_inputs, merged_outputs, unless_disconnected

logger = logging.getLogger(__name__)


async def create_completion(
    req: CompletionRequest, raw: Request, engine: AsyncEngine, model_name: str
) -> JSONResponse | StreamingResponse:
    check_unsupported(req)
    llm = engine.check()
    prompt_list = completion_prompts(llm.tokenizer, req)
    max_tokens = completion_max_tokens(req)
    # Choice k belongs to prompt k // n (OpenAI's ordering for several prompts with n > 1).
    prompts = [p for p in prompt_list for _ in range(req.n)]
    params = [
        sampling_params(req, max_tokens=max_tokens, defaults=llm.default_sampling, index=k % req.n)
        for k in range(len(prompts))
    ]
    check_inputs(engine, prompts, params)
    request_id = random_id("cmpl-")
    created = int(time.time())
    n_prompt = sum(len(p) for p in prompt_list)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream(engine, request_id, created, model_name, prompts, params, include_usage, n_prompt),
            media_type="text/event-stream",
        )

    async def collect() -> CompletionResponse:
        k = len(prompts)
        texts = [""] * k
        finish: list[str | None] = [None] * k
        stop_reason: list[int | str | None] = [None] * k
        completion_tokens = [0] * k
        async for i, out in merged_outputs(engine, request_id, prompts, params):
            texts[i] += out.new_text
            completion_tokens[i] = out.num_output_tokens
            if out.finished:
                finish[i], stop_reason[i] = out.finish_reason, out.stop_reason
        return CompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=[
                CompletionChoice(index=i, text=texts[i], finish_reason=finish[i], stop_reason=stop_reason[i])
                for i in range(k)
            ],
            usage=UsageInfo(
                prompt_tokens=n_prompt,
                completion_tokens=sum(completion_tokens),
                total_tokens=n_prompt + sum(completion_tokens),
            ),
        )

    result = await unless_disconnected(raw, collect)
    if result is None:
        return JSONResponse(error_body(499, "client disconnected", type="ClientDisconnected"), status_code=499)
    return JSONResponse(result.model_dump())


async def _stream(
    engine: AsyncEngine,
    request_id: str,
    created: int,
    model_name: str,
    prompts: list[list[int]],
    params: list,
    include_usage: bool,
    n_prompt: int,
) -> AsyncIterator[str]:
    completion_tokens = [0] * len(prompts)
    try:
        async for i, out in merged_outputs(engine, request_id, prompts, params):
            completion_tokens[i] = out.num_output_tokens
            if out.new_text or out.finished:
                yield sse(
                    CompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=model_name,
                        choices=[
                            CompletionChoice(
                                index=i,
                                text=out.new_text,
                                finish_reason=out.finish_reason if out.finished else None,
                                stop_reason=out.stop_reason if out.finished else None,
                            )
                        ],
                    )
                )
        if include_usage:
            total = sum(completion_tokens)
            yield sse(
                CompletionStreamResponse(
                    id=request_id, created=created, model=model_name, choices=[],
                    usage=UsageInfo(prompt_tokens=n_prompt, completion_tokens=total, total_tokens=n_prompt + total),
                )
            )
    except OpenAIError as e:
        yield sse(error_body(e.status, e.message, param=e.param, type=e.type))
    except Exception as e:  # noqa: BLE001 - report inside the stream; the HTTP status is already sent
        logger.exception("error while streaming %s", request_id)
        yield sse(error_body(500, f"internal error: {type(e).__name__}"))
    yield DONE
