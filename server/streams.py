"""Running the engine requests behind one HTTP request: choices merged, disconnects abort.

One HTTP request becomes ``len(prompts) * n`` engine requests (choice ``i`` is prompt
``i // n``); their outputs are merged as they arrive. Leaving the merged iterator early (client
gone, error) cancels every engine request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request

from jaxserve.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from jaxserve.engine.output_processor import RequestOutput
from jaxserve.sampling_params import SamplingParamError, SamplingParams
from jaxserve.server.errors import OpenAIError

T = TypeVar("T")


def check_inputs(engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """Validate every choice before anything is queued or streamed (raises OpenAIError)."""
    try:
        llm = engine.check()
        for prompt, p in zip(prompts, params, strict=True):
            llm.check_request(prompt, p)
        if engine.max_queue_size is not None and engine.num_waiting() + len(prompts) > engine.max_queue_size:
            raise QueueFullError(f"the server is busy: {engine.num_waiting()} requests are already waiting")
    except QueueFullError as e:
        raise OpenAIError(503, str(e)) from None
    except EngineDeadError as e:
        raise OpenAIError(503, str(e)) from None
    except SamplingParamError as e:
        raise OpenAIError(400, str(e), param=e.param) from None


async def merged_outputs(
    engine: AsyncEngine, base_id: str, prompts: list[list[int]], params: list[SamplingParams]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (choice index, output) for all choices, interleaved as the engine produces them."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int) -> None:
        try:
            async for out in engine.generate(f"{base_id}-{i}", prompts[i], params[i]):
                q.put_nowait((i, out))
            q.put_nowait((i, done))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            q.put_nowait((i, e))
            if isinstance(e, asyncio.CancelledError):
                raise

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise _as_openai_error(item)
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _as_openai_error(e: BaseException) -> BaseException:
    if isinstance(e, SamplingParamError):
        return OpenAIError(400, str(e), param=e.param)
    if isinstance(e, QueueFullError):
        return OpenAIError(503, str(e))
    if isinstance(e, EngineDeadError):
        return OpenAIError(503, str(e))
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
