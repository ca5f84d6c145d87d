"""``POST /v1/completions``: text completions for one or many prompts, streaming or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.errors import OpenAIError, error_body
from jaxserve.server.logprobs import TokenText, completion_logprobs, merge_completion_logprobs
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
    echoes = [llm.tokenizer.decode(p, skip_special_tokens=req.skip_special_tokens) if req.echo else "" for p in prompts]
    request_id = random_id("cmpl-")
    created = int(time.time())
    n_prompt = sum(len(p) for p in prompt_list)
    tt = TokenText(llm.tokenizer, as_ids=req.return_tokens_as_token_ids)
    if req.stream:
        opts = req.stream_options
        return StreamingResponse(
            _stream(engine, tt, request_id, created, model_name, prompts, params, echoes, n_prompt,
                    include_usage=bool(opts and opts.include_usage),
                    continuous_usage=bool(opts and opts.continuous_usage_stats)),
            media_type="text/event-stream",
        )

    async def collect() -> CompletionResponse:
        k = len(prompts)
        texts = list(echoes)
        lp_parts: list[list[dict]] = [[] for _ in range(k)]
        finish: list[str | None] = [None] * k
        stop_reason: list[int | str | None] = [None] * k
        completion_tokens = [0] * k
        async for i, out in merged_outputs(engine, request_id, prompts, params):
            if out.logprobs:
                lp_parts[i].append(completion_logprobs(tt, out.logprobs, _offset(lp_parts[i])))
            texts[i] += out.new_text
            completion_tokens[i] = out.num_output_tokens
            if out.finished:
                finish[i], stop_reason[i] = out.finish_reason, out.stop_reason
        return CompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=[
                CompletionChoice(
                    index=i, text=texts[i], finish_reason=finish[i], stop_reason=stop_reason[i],
                    logprobs=merge_completion_logprobs(lp_parts[i]) if params[i].logprobs is not None else None,
                )
                for i in range(k)
            ],
            usage=_usage(n_prompt, sum(completion_tokens)),
        )

    result = await unless_disconnected(raw, collect)
    if result is None:
        return JSONResponse(error_body(499, "client disconnected", type="ClientDisconnected"), status_code=499)
    return JSONResponse(result.model_dump())


def _offset(parts: list[dict]) -> int:
    """Character offset where the next token's text starts (tokens so far, no echo with logprobs)."""
    if not parts or not parts[-1]["tokens"]:
        return 0
    last = parts[-1]
    return last["text_offset"][-1] + len(last["tokens"][-1])


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
    prompts: list[list[int]],
    params: list[SamplingParams],
    echoes: list[str],
    n_prompt: int,
    *,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[str]:
    completion_tokens = [0] * len(prompts)
    lp_parts: list[list[dict]] = [[] for _ in prompts]
    echoed = [not e for e in echoes]

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        if usage is None and continuous_usage and include_usage:
            usage = _usage(n_prompt, sum(completion_tokens))
        return sse(CompletionStreamResponse(id=request_id, created=created, model=model_name, choices=choices,
                                            usage=usage))

    try:
        async for i, out in merged_outputs(engine, request_id, prompts, params):
            completion_tokens[i] = out.num_output_tokens
            text = out.new_text
            if not echoed[i]:
                text, echoed[i] = echoes[i] + text, True
            lp = None
            if out.logprobs and params[i].logprobs is not None:
                lp = completion_logprobs(tt, out.logprobs, _offset(lp_parts[i]))
                lp_parts[i].append(lp)
            if text or out.finished or lp:
                yield chunk([
                    CompletionChoice(
                        index=i, text=text, logprobs=lp,
                        finish_reason=out.finish_reason if out.finished else None,
                        stop_reason=out.stop_reason if out.finished else None,
                    )
                ])
        if include_usage:
            yield chunk([], _usage(n_prompt, sum(completion_tokens)))
    except OpenAIError as e:
        yield sse(error_body(e.status, e.message, param=e.param, type=e.type))
    except Exception as e:  # noqa: BLE001 - report inside the stream; the HTTP status is already sent
        logger.exception("error while streaming %s", request_id)
        yield sse(error_body(500, f"internal error: {type(e).__name__}"))
    yield DONE
