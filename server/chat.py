"""``POST /v1/chat/completions``: the chat shapes over the shared stream/collect skeleton."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.output_processor import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.chat_output import ChoiceParser, Parsed, coalesce, finish_reason, whole_message
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
)
from jaxserve.server.offload import off_loop
from jaxserve.server.request_id import job_id
from jaxserve.server.requests import chat_max_tokens, chat_prompt_ids, check_unsupported, sampling_params
from jaxserve.server.streams import Collected, Job, respond, submit
from jaxserve.server.tool_calls import ChatOptions, plan_tools, thinking


class ChatEndpoint:
    """Chat chunks and responses for one request (``Endpoint`` of ``server/streams.py``)."""

    def __init__(self, job: Job, tt: TokenText, model_name: str, parsers: Callable[[], ChoiceParser]) -> None:
        self.job, self.tt, self.model_name = job, tt, model_name
        self.created = int(time.time())
        self.new_parser = parsers
        self.parsers = [parsers() for _ in job.params]  # the stream's, one per choice

    def _wants_logprobs(self, i: int) -> bool:
        return self.job.params[i].logprobs is not None

    def opening(self) -> list[ChatCompletionStreamChoice]:
        return [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(len(self.job.params))]

    def stream_choice(self, i: int, out: RequestOutput) -> list[ChatCompletionStreamChoice]:
        """One choice per delta: text first, then each tool-call piece on its own (OpenAI sends a
        call's opening and its argument fragments in separate chunks); logprobs and the finish
        reason ride on the last."""
        want_lp = self._wants_logprobs(i) and bool(out.logprobs)
        parser = self.parsers[i]
        part = parser.feed(out.new_text)
        if out.finished:
            end = parser.finish()
            part = Parsed(part.reasoning + end.reasoning, part.content + end.content, part.tool_calls + end.tool_calls)
        deltas = [DeltaMessage(tool_calls=[call]) for call in coalesce(part.tool_calls)]
        if part.content or part.reasoning or not deltas:
            deltas.insert(0, DeltaMessage(content=part.content or None, reasoning_content=part.reasoning or None))
        if not (part.content or part.reasoning or part.tool_calls or out.finished or want_lp):
            return []
        choices = [ChatCompletionStreamChoice(index=i, delta=d) for d in deltas]
        last = choices[-1]
        last.logprobs = chat_logprobs(self.tt, out.logprobs) if want_lp else None
        if out.finished:
            last.finish_reason, last.stop_reason = finish_reason(parser, out.finish_reason), out.stop_reason
        return choices

    def chunk(self, choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.job.request_id, created=self.created, model=self.model_name,
                                   choices=choices, usage=usage)

    def response(self, choices: list[Collected], usage: UsageInfo) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.job.request_id, created=self.created, model=self.model_name, usage=usage,
            choices=[self._choice(i, c) for i, c in enumerate(choices)],
        )

    def _choice(self, i: int, c: Collected) -> ChatCompletionChoice:
        parser = self.new_parser()
        content, reasoning, calls = whole_message(parser, c.text)
        return ChatCompletionChoice(
            index=i, message=ChatResponseMessage(content=content, reasoning_content=reasoning, tool_calls=calls),
            logprobs=chat_logprobs(self.tt, c.logprobs) if self._wants_logprobs(i) else None,
            finish_reason=finish_reason(parser, c.finish_reason), stop_reason=c.stop_reason,
        )


async def create_chat_completion(
    req: ChatCompletionRequest, raw: Request, engine: AsyncEngine, model_name: str, opts: ChatOptions,
    lora: str | None = None,
) -> JSONResponse | StreamingResponse:
    """``POST /v1/chat/completions`` for a resolved model: render the chat prompt (tools, template), submit
    ``n`` choices and answer with one JSON response or an SSE stream; unsupported fields are a 400."""
    check_unsupported(req)
    info = engine.info
    plan = plan_tools(req, opts, opts.chat_template or info.tokenizer.chat_template)
    prompt = await off_loop(lambda: chat_prompt_ids(info.tokenizer, req, tools=plan.template_tools,
                                                    chat_template=opts.chat_template))
    max_tokens = chat_max_tokens(req)
    params: list[SamplingParams] = [
        sampling_params(req, max_tokens=max_tokens, defaults=info.default_sampling, index=i,
                        tool_constraint=plan.structured, reasoning_parser=thinking(req, opts))
        for i in range(req.n)
    ]
    job = Job(job_id("chatcmpl-"), [prompt] * req.n, params, len(prompt), req.stream, req.stream_options, lora)
    endpoint = ChatEndpoint(job, TokenText(info.tokenizer, as_ids=req.return_tokens_as_token_ids), model_name,
                            lambda: ChoiceParser(opts.reasoning_parser, plan.parse_format, plan.max_calls))
    return await respond(raw, await submit(engine, job), job, endpoint)
