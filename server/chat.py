"""``POST /v1/chat/completions``: non-streaming and SSE streaming."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.server.errors import OpenAIError, error_body
from jaxserve.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
    random_id,
)
from jaxserve.server.requests import chat_max_tokens, chat_prompt_ids, check_unsupported, sampling_params
from jaxserve.server.sse import DONE, sse
from jaxserve.server.streams import check_inputs, merged_outputs, unless_disconnected

logger = logging.getLogger(__name__)


async def create_chat_completion(
    req: ChatCompletionRequest, raw: Request, engine: AsyncEngine, model_name: str
) -> JSONResponse | StreamingResponse:
    check_unsupported(req)
    llm = engine.check()
    prompt = chat_prompt_ids(llm.tokenizer, req)
    max_tokens = chat_max_tokens(req)
    defaults = llm.default_sampling
    params = [sampling_params(req, max_tokens=max_tokens, defaults=defaults, index=i) for i in range(req.n)]
    prompts = [prompt] * req.n
    check_inputs(engine, prompts, params)
    request_id = random_id("chatcmpl-")
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream(engine, request_id, created, model_name, prompts, params, include_usage),
            media_type="text/event-stream",
        )

    async def collect() -> ChatCompletionResponse:
        texts = [""] * req.n
        finish: list[str | None] = [None] * req.n
        stop_reason: list[int | str | None] = [None] * req.n
        completion_tokens = [0] * req.n
        async for i, out in merged_outputs(engine, request_id, prompts, params):
            texts[i] += out.new_text
            completion_tokens[i] = out.num_output_tokens
            if out.finished:
                finish[i], stop_reason[i] = out.finish_reason, out.stop_reason
        n_prompt = len(prompt)
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=[
                ChatCompletionChoice(
                    index=i,
                    message=ChatResponseMessage(content=texts[i]),
                    finish_reason=finish[i],
                    stop_reason=stop_reason[i],
                )
                for i in range(req.n)
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
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model_name, choices=choices, usage=usage))

    n = len(prompts)
    completion_tokens = [0] * n
    try:
        for i in range(n):
            yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for i, out in merged_outputs(engine, request_id, prompts, params):
            completion_tokens[i] = out.num_output_tokens
            if out.new_text or out.finished:
                yield chunk([
                    ChatCompletionStreamChoice(
                        index=i,
                        delta=DeltaMessage(content=out.new_text or None) if out.new_text else DeltaMessage(),
                        finish_reason=out.finish_reason if out.finished else None,
                        stop_reason=out.stop_reason if out.finished else None,
                    )
                ])
        if include_usage:
            n_prompt = sum(len(p) for p in prompts[:1])
            total_out = sum(completion_tokens)
            yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=total_out, total_tokens=n_prompt + total_out))
    except OpenAIError as e:
        yield sse(error_body(e.status, e.message, param=e.param, type=e.type))
    except Exception as e:  # noqa: BLE001 - report inside the stream; the HTTP status is already sent
        logger.exception("error while streaming %s", request_id)
        yield sse(error_body(500, f"internal error: {type(e).__name__}"))
    yield DONE
