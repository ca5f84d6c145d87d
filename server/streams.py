"""The skeleton chat and completions share: submit, then stream SSE chunks or collect one response.

One HTTP request becomes ``len(prompts) * n`` engine requests (choice ``i`` is prompt ``i // n``),
submitted together: every choice is validated and the queue rule applied before any stream
starts. Outputs arrive interleaved. Leaving early (client gone, error) aborts every unfinished
choice, which frees its KV blocks at once. An endpoint supplies only its shapes (``Endpoint``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from jaxserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    SlowReaderError,
    Submission,
)
from jaxserve.engine.lora_slots import LoraNotFoundError
from jaxserve.engine.output_processor import RequestOutput, TokenLogprob
from jaxserve.sampling_params import SamplingParamError, SamplingParams
from jaxserve.server.errors import OpenAIError, error_body
from jaxserve.server.protocol import StreamOptions, UsageInfo
from jaxserve.server.sse import DONE, sse

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass
class Collected:
    """One choice of a non-streaming response, accumulated from its outputs."""

    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.logprobs.extend(out.logprobs or [])
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


class Endpoint(Protocol):
    """What an endpoint supplies: its chunk and response shapes."""

    def opening(self) -> list[BaseModel]:
        """Stream choices sent (one chunk each) before any output (chat: the role deltas)."""

    def stream_choice(self, i: int, out: RequestOutput) -> list[BaseModel]:
        """The stream choices for one output of choice ``i``, one chunk each (none: nothing to send)."""

    def chunk(self, choices: list[BaseModel], usage: UsageInfo | None) -> BaseModel: ...

    def response(self, choices: list[Collected], usage: UsageInfo) -> BaseModel: ...


@dataclasses.dataclass
class Job:
    """One HTTP request's engine work."""

    request_id: str
    prompts: list[list[int]]  # one per choice
    params: list[SamplingParams]  # one per choice
    num_prompt_tokens: int  # each distinct prompt counted once (usage)
    stream: bool
    stream_options: StreamOptions | None
    lora: str | None = None  # the LoRA adapter every choice runs with (the request's model names it)

    def usage(self, completion_tokens: list[int]) -> UsageInfo:
        n, c = self.num_prompt_tokens, sum(completion_tokens)
        return UsageInfo(prompt_tokens=n, completion_tokens=c, total_tokens=n + c)


async def submit(engine: AsyncEngine, job: Job) -> Submission:
    """Compile the choices' grammars, then queue every choice of ``job``; or raise an OpenAIError
    before anything is queued."""
    try:
        grammars = await engine.compile_grammars(job.params)
        return engine.submit(job.request_id, job.prompts, job.params, grammars, bounded=job.stream, lora=job.lora)
    except Exception as e:
        raise _as_openai_error(e) from None


async def respond(raw: Request, sub: Submission, job: Job, endpoint: Endpoint) -> JSONResponse | StreamingResponse:
    """Stream ``sub``'s outputs as SSE chunks, or collect them into one response."""
    if job.stream:
        return StreamingResponse(_sse(sub, job, endpoint), media_type="text/event-stream")
    result = await unless_disconnected(raw, lambda: _collect(sub, job, endpoint))
    if result is None:
        return JSONResponse(error_body(499, "client disconnected", type="ClientDisconnected"), status_code=499)
    return JSONResponse(result.model_dump())


async def _collect(sub: Submission, job: Job, endpoint: Endpoint) -> BaseModel:
    choices = [Collected() for _ in job.prompts]
    tokens = [0] * len(job.prompts)
    try:
        async for i, out in sub.outputs():
            tokens[i] = out.num_output_tokens
            choices[i].add(out)
    except Exception as e:
        raise _as_openai_error(e) from None
    return endpoint.response(choices, job.usage(tokens))


async def _sse(sub: Submission, job: Job, endpoint: Endpoint) -> AsyncIterator[str]:
    opts = job.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)
    tokens = [0] * len(job.prompts)

    def chunk(choices: list[BaseModel]) -> str:
        return sse(endpoint.chunk(choices, job.usage(tokens) if continuous else None))

    try:
        for choice in endpoint.opening():
            yield chunk([choice])
        async for i, out in sub.outputs():
            tokens[i] = out.num_output_tokens
            for choice in endpoint.stream_choice(i, out):
                yield chunk([choice])
        if include_usage:
            yield sse(endpoint.chunk([], job.usage(tokens)))
    except Exception as e:  # noqa: BLE001 - reported inside the stream: the HTTP status is already sent
        err = _as_openai_error(e)
        if not isinstance(err, OpenAIError):
            logger.exception("error while streaming %s", job.request_id)
            err = OpenAIError(500, f"internal error: {type(e).__name__}")
        yield sse(error_body(err.status, err.message, param=err.param, type=err.type))
    finally:
        sub.close()
    yield DONE


def _as_openai_error(e: BaseException) -> BaseException:
    if isinstance(e, SamplingParamError):
        return OpenAIError(400, str(e), param=e.param)
    if isinstance(e, QueueFullError | EngineDeadError):
        return OpenAIError(503, str(e))
    if isinstance(e, LoraNotFoundError):
        return OpenAIError(404, str(e), param="model", type="NotFoundError")
    if isinstance(e, SlowReaderError):
        return OpenAIError(408, str(e), type="ClientTooSlowError")
    if isinstance(e, RequestFailedError):
        return OpenAIError(500, f"internal error while generating this request: {e}")
    return e


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``work`` but cancel it (aborting its engine requests) if the client disconnects."""
    task = asyncio.create_task(work())
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
    return task.result()
