"""OpenAI request -> engine inputs: prompt token ids and SamplingParams, or a 400.

Every request field is either turned into engine behaviour here or rejected with an OpenAIError
naming it; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jaxserve.sampling_params import SamplingParamError, SamplingParams, StructuredOutput
from jaxserve.server.errors import OpenAIError
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, ToolCallIn
from jaxserve.server.reasoning import after_reasoning
from jaxserve.server.structured import structured_output
from jaxserve.tokenizer import Tokenizer

DEFAULT_COMPLETION_MAX_TOKENS = 16


def _reject(param: str, why: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {why}", param=param)


def check_unsupported(req: SamplingFields) -> None:
    """Fields in the schema whose feature is not implemented yet: 400 instead of silence."""
    if req.stream_options is not None and not req.stream:
        raise _reject("stream_options", "only allowed when stream is true")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise _reject("top_logprobs", "requires logprobs to be true")
    else:
        if req.echo and req.logprobs is not None:
            raise _reject("logprobs", "logprobs together with echo (prompt logprobs) are not supported yet")
        if req.suffix:
            raise _reject("suffix", "suffix (fill-in-the-middle) is not supported by this server")
        if req.best_of not in (None, 1) and req.best_of != req.n:
            raise _reject("best_of", "best_of other than n is not supported")


def _logit_bias(raw: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    out = []
    for key, value in raw.items():
        try:
            out.append((int(key), float(value)))
        except (TypeError, ValueError):
            raise _reject("logit_bias", f"keys must be token ids, got {key!r}") from None
    return tuple(out)


def requested_logprobs(req: SamplingFields) -> int | None:
    """How many top logprobs to return per token (None: no logprobs)."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs  # type: ignore[union-attr]


def sampling_params(
    req: SamplingFields, *, max_tokens: int | None, defaults: Mapping[str, Any], index: int = 0,
    tool_constraint: StructuredOutput | None = None, reasoning_parser: str | None = None,
) -> SamplingParams:
    """SamplingParams for choice ``index`` (seeded requests get seed + index so choices differ).

    ``tool_constraint``: the grammar of the request's tool calls (``server/tool_calls.py``);
    ``reasoning_parser``: a structured output applies after the thinking section."""
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    structured = structured_output(req)
    if tool_constraint is not None:
        if structured is not None:
            raise _reject(structured.param, "cannot be combined with tool_choice 'required', a named tool "
                          "or strict tools (their calls are constrained already)")
        structured = tool_constraint
    else:
        structured = after_reasoning(structured, reasoning_parser)

    def pick(name: str, fallback: Any) -> Any:
        v = getattr(req, name)
        return v if v is not None else defaults.get(name, fallback)

    try:
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            seed=None if req.seed is None else req.seed + index,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            stop=tuple(stop),
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logit_bias=_logit_bias(req.logit_bias),
            logprobs=requested_logprobs(req),
            structured=structured,
        )
    except SamplingParamError as e:
        raise OpenAIError(400, str(e), param=e.param) from None


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _tool_calls(i: int, calls: list[ToolCallIn]) -> list[dict[str, Any]]:
    """An assistant message's tool calls for the template, arguments as JSON values (templates
    serialise them with ``tojson``)."""
    out = []
    for j, c in enumerate(calls):
        try:
            arguments = json.loads(c.function.arguments) if c.function.arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise _reject(f"messages[{i}].tool_calls[{j}].function.arguments", f"not valid JSON: {e}") from None
        out.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": arguments}})
    return out


def _template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for i, m in enumerate(req.messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": _message_text(m.content)}
        if m.tool_calls:
            if m.role != "assistant":
                raise _reject(f"messages[{i}].tool_calls", "only assistant messages have tool_calls")
            msg["tool_calls"] = _tool_calls(i, m.tool_calls)
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        messages.append(msg)
    return messages


def chat_prompt_ids(
    tok: Tokenizer, req: ChatCompletionRequest, *, tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Render the chat template (``chat_template`` overrides the tokenizer's) and tokenize (the
    template places any special tokens itself)."""
    return tok.encode(chat_prompt_text(tok, req, tools=tools, chat_template=chat_template), add_special_tokens=False)


def chat_prompt_text(
    tok: Tokenizer, req: ChatCompletionRequest, *, tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
) -> str:
    """The chat template rendered for ``req``'s messages (a 400 naming the problem if it cannot be)."""
    if req.continue_final_message and req.add_generation_prompt:
        raise _reject("continue_final_message", "cannot be combined with add_generation_prompt=true")
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise _reject("continue_final_message", "the last message must be an assistant message")
    messages = _template_messages(req)
    if chat_template is None and tok.chat_template is None:
        raise OpenAIError(400, "this model has no chat template; use /v1/completions or start the server "
                          "with --chat-template", param="messages")
    try:
        return tok.apply_chat_template(
            messages,
            tools=tools,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}),
        )
    except Exception as e:  # noqa: BLE001 - template errors are the client's input
        raise OpenAIError(400, f"could not apply the chat template: {e}", param="messages") from None


def completion_prompts(tok: Tokenizer, req: CompletionRequest) -> list[list[int]]:
    """One token list per prompt (a string, strings, token ids or lists of token ids)."""
    p = req.prompt
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    if not prompts:
        raise _reject("prompt", "must not be empty")
    out = []
    for item in prompts:
        ids = tok.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise _reject("prompt", "a prompt is empty")
        out.append(ids)
    return out


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    if req.max_completion_tokens is not None and req.max_tokens is not None and req.max_completion_tokens != req.max_tokens:
        raise _reject("max_completion_tokens", "conflicts with max_tokens; set only one")
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def completion_max_tokens(req: CompletionRequest) -> int:
    return req.max_tokens if req.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
