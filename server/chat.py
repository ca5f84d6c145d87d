"""``POST /v1/chat/completions``: non-streaming and SSE streaming."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.errors import OpenAIError, error_body
from jaxserve.server.logprobs import TokenText, chat_logprobs
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
    params = [
        sampling_params(req, max_tokens=max_tokens, defaults=llm.default_sampling, index=i) for i in range(req.n)
    ]
    prompts = [prompt] * req.n
    check_inputs(engine, prompts, params)
    request_id = random_id("chatcmpl-")
    created = int(time.time())
    tt = TokenText(llm.tokenizer, as_ids=req.return_tokens_as_token_ids)
    if req.stream:
        opts = req.stream_options
        return StreamingResponse(
            _stream(engine, tt, request_id, created, model_name, prompt, params,
                    include_usage=bool(opts and opts.include_usage),
                    continuous_usage=bool(opts and opts.continuous_usage_stats)),
            media_type="text/event-stream",
        )

    async def collect() -> ChatCompletionResponse:
        n = req.n
        texts = [""] * n
        lps: list[list] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        stop_reason: list[int | str | None] = [None] * n
        completion_tokens = [0] * n
        async for i, out in merged_outputs(engine, request_id, prompts, params):
            texts[i] += out.new_text
            lps[i].extend(out.logprobs or [])
            completion_tokens[i] = out.num_output_tokens
            if out.finished:
                finish[i], stop_reason[i] = out.finish_reason, out.stop_reason
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=[
                ChatCompletionChoice(
                    index=i,
                    message=ChatResponseMessage(content=texts[i]),
                    logprobs=chat_logprobs(tt, lps[i]) if params[i].logprobs is not None else None,
                    finish_reason=finish[i],
                    stop_reason=stop_reason[i],
                )
                for i in range(n)
            ],
            usage=_usage(len(prompt), sum(completion_tokens)),
        )

    result = await unless_disconnected(raw, collect)
    if result is None:
        return JSONResponse(error_body(499, "client disconnected", type="ClientDisconnected"), status_code=499)
    return JSONResponse(result.model_dump())


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


async def _stream(
    engine: AsyncEngine,
    tt: TokenText,
    request_id: str,
    created: int,
    model_name: str,
    prompt: list[int],
    params: list[SamplingParams],
    *,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[str]:
    n = len(params)
    completion_tokens = [0] * n

    def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
        if usage is None and continuous_usage and include_usage:
            usage = _usage(len(prompt), sum(completion_tokens))
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model_name, choices=choices, usage=usage))

    try:
        for i in range(n):
            yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for i, out in merged_outputs(engine, request_id, [prompt] * n, params):
            completion_tokens[i] = out.num_output_tokens
            want_lp = params[i].logprobs is not None and bool(out.logprobs)
            if out.new_text or out.finished or want_lp:
                yield chunk([
                    ChatCompletionStreamChoice(
                        index=i,
                        delta=DeltaMessage(content=out.new_text) if out.new_text else DeltaMessage(),
                        logprobs=chat_logprobs(tt, out.logprobs) if want_lp else None,
                        finish_reason=out.finish_reason if out.finished else None,
                        stop_reason=out.stop_reason if out.finished else None,
                    )
                ])
        if include_usage:
            yield chunk([], _usage(len(prompt), sum(completion_tokens)))
    except OpenAIError as e:
        yield sse(error_body(e.status, e.message, param=e.param, type=e.type))
    except Exception as e:  # noqa: BLE001 - report inside the stream; the HTTP status is already sent
        logger.exception("error while streaming %s", request_id)
        yield sse(error_body(500, f"internal error: {type(e).__name__}"))
    yield DONE
