"""``POST /v1/completions``: text completions for one or many prompts, over the shared skeleton."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.output_processor import RequestOutput
from jaxserve.server.logprobs import TokenText, completion_logprobs
from jaxserve.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
)
from jaxserve.server.offload import off_loop
from jaxserve.server.request_id import job_id
from jaxserve.server.requests import check_unsupported, completion_max_tokens, completion_prompts, sampling_params
from jaxserve.server.streams import Collected, Job, respond, submit


class CompletionEndpoint:
    """Completion chunks and responses (``Endpoint`` of ``server/streams.py``); ``echoes[i]``
    is the prompt text put before choice ``i``'s output ('' without ``echo``)."""

    def __init__(self, job: Job, tt: TokenText, model_name: str, echoes: list[str]) -> None:
        self.job, self.tt, self.model_name, self.echoes = job, tt, model_name, echoes
        self.created = int(time.time())
        self.pending_echo = [bool(e) for e in echoes]
        self.text_offset = [0] * len(echoes)  # characters of token text streamed so far (logprobs)

    def _wants_logprobs(self, i: int) -> bool:
        return self.job.params[i].logprobs is not None

    def opening(self) -> list[CompletionChoice]:
        return []

    def stream_choice(self, i: int, out: RequestOutput) -> list[CompletionChoice]:
        """Choice ``i``'s streamed piece of one output: echo first, then the new text and logprobs; [] when empty."""
        text = out.new_text
        if self.pending_echo[i]:
            text, self.pending_echo[i] = self.echoes[i] + text, False
        lp = None
        if out.logprobs and self._wants_logprobs(i):
            lp = completion_logprobs(self.tt, out.logprobs, self.text_offset[i])
            self.text_offset[i] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        if not (text or out.finished or lp):
            return []
        return [CompletionChoice(
            index=i, text=text, logprobs=lp,
            finish_reason=out.finish_reason if out.finished else None,
            stop_reason=out.stop_reason if out.finished else None,
        )]

    def chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.job.request_id, created=self.created, model=self.model_name,
                                        choices=choices, usage=usage)

    def response(self, choices: list[Collected], usage: UsageInfo) -> CompletionResponse:
        """The non-streaming response: every choice's full text (echo included) and logprobs."""
        return CompletionResponse(
            id=self.job.request_id, created=self.created, model=self.model_name, usage=usage,
            choices=[
                CompletionChoice(
                    index=i, text=self.echoes[i] + c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    logprobs=completion_logprobs(self.tt, c.logprobs, 0)
                    if c.logprobs and self._wants_logprobs(i) else None,
                )
                for i, c in enumerate(choices)
            ],
        )


async def create_completion(
    req: CompletionRequest, raw: Request, engine: AsyncEngine, model_name: str,
    lora: str | None = None,
) -> JSONResponse | StreamingResponse:
    """``POST /v1/completions`` for a resolved model: ``n`` choices per prompt (choice k: prompt k // n),
    answered as one JSON response or an SSE stream; unsupported fields are a 400."""
    check_unsupported(req)
    info = engine.info
    prompt_list = await off_loop(completion_prompts, info.tokenizer, req)
    max_tokens = completion_max_tokens(req)
    # Choice k belongs to prompt k // n (OpenAI's ordering for several prompts with n > 1).
    prompts = [p for p in prompt_list for _ in range(req.n)]
    params = [
        sampling_params(req, max_tokens=max_tokens, defaults=info.default_sampling, index=k % req.n)
        for k in range(len(prompts))
    ]
    job = Job(job_id("cmpl-"), prompts, params, sum(len(p) for p in prompt_list), req.stream, req.stream_options, lora)
    sub = await submit(engine, job)  # validates the prompt ids before they are decoded for echo
    echoes = [info.tokenizer.decode(p, skip_special_tokens=req.skip_special_tokens) if req.echo else ""
              for p in prompts]
    tt = TokenText(info.tokenizer, as_ids=req.return_tokens_as_token_ids)
    return await respond(raw, sub, job, CompletionEndpoint(job, tt, model_name, echoes))
