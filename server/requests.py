"""OpenAI request -> engine inputs: prompt token ids and SamplingParams, or a 400.

Every request field is either turned into engine behaviour here or rejected with an OpenAIError
naming it; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxserve.sampling_params import SamplingParamError, SamplingParams
from jaxserve.server.errors import OpenAIError
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
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
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            value = getattr(req, name)
            if value is not None and not (name == "tool_choice" and value == "none"):
                raise _reject(name, "tools are not supported yet")
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
    req: SamplingFields, *, max_tokens: int | None, defaults: Mapping[str, Any], index: int = 0
) -> SamplingParams:
    """SamplingParams for choice ``index`` (seeded requests get seed + index so choices differ)."""
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    structured = structured_output(req)

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


def chat_prompt_ids(tok: Tokenizer, req: ChatCompletionRequest) -> list[int]:
    """Render the chat template and tokenize (the template places any special tokens itself)."""
    if req.continue_final_message and req.add_generation_prompt:
        raise _reject("continue_final_message", "cannot be combined with add_generation_prompt=true")
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise _reject("continue_final_message", "the last message must be an assistant message")
    messages = []
    for m in req.messages:
        if m.tool_calls:
            raise _reject("messages", "assistant tool_calls are not supported yet")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": _message_text(m.content)}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    if tok.chat_template is None:
        raise OpenAIError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}),
        )
    except Exception as e:  # noqa: BLE001 - template errors are the client's input
        raise OpenAIError(400, f"could not apply the chat template: {e}", param="messages") from None
    return tok.encode(text, add_special_tokens=False)


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
