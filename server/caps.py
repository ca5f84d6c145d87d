"""Per-request caps: the one place a request's size is checked against the server's limits.

Each cap is a ``ServeConfig`` field (a CLI flag and YAML key, vLLM's name where vLLM has one:
``--max-logprobs``); every route calls ``check_caps`` before it tokenizes anything or reaches an
engine, and an exceeded cap is a 400 naming the field. The body size itself is
``server/limits.py``'s (413), JSON well-formedness ``server/json_body.py``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.config import ServeConfig
from jaxserve.server.errors import OpenAIError
from jaxserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ScoreRequest,
    TokenizeRequest,
)


@dataclasses.dataclass(frozen=True)
class RequestCaps:
    max_n: int = 128
    max_logprobs: int = 20
    max_stop_strings: int = 64
    max_logit_bias: int = 300
    max_messages: int = 2048
    max_prompt_chars: int = 1 << 20

    @classmethod
    def from_config(cls, config: ServeConfig) -> RequestCaps:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def _over(param: str, what: str, got: int, cap: int, flag: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {what} {got} exceeds this server's limit of {cap} (--{flag})", param=param)


def _chars(value: Any) -> int:
    """Characters of text in a prompt, message content or input (token ids count none)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return len(getattr(value, "text", None) or "")


def _check_chars(param: str, value: Any, caps: RequestCaps) -> None:
    n = _chars(value)
    if n > caps.max_prompt_chars:
        raise _over(param, "the number of characters to tokenize", n, caps.max_prompt_chars, "max-prompt-chars")


def _check_messages(messages: list | None, caps: RequestCaps) -> None:
    if messages is None:
        return
    if len(messages) > caps.max_messages:
        raise _over("messages", "the number of messages", len(messages), caps.max_messages, "max-messages")
    _check_chars("messages", [m.content for m in messages if m.content is not None], caps)


def _check_sampling(req: ChatCompletionRequest | CompletionRequest, caps: RequestCaps) -> None:
    if req.n > caps.max_n:
        raise _over("n", "n", req.n, caps.max_n, "max-n")
    if isinstance(req.stop, list) and len(req.stop) > caps.max_stop_strings:
        raise _over("stop", "the number of stop strings", len(req.stop), caps.max_stop_strings, "max-stop-strings")
    if req.logit_bias is not None and len(req.logit_bias) > caps.max_logit_bias:
        raise _over("logit_bias", "the number of entries", len(req.logit_bias), caps.max_logit_bias, "max-logit-bias")
    param, k = ("top_logprobs", req.top_logprobs) if isinstance(req, ChatCompletionRequest) else ("logprobs", req.logprobs)
    if k is not None and k > caps.max_logprobs:
        raise _over(param, param, k, caps.max_logprobs, "max-logprobs")


def check_caps(req: Any, caps: RequestCaps) -> None:
    """400 naming the first field of ``req`` over a cap; nothing else is checked here."""
    if isinstance(req, ChatCompletionRequest):
        _check_sampling(req, caps)
        _check_messages(req.messages, caps)
    elif isinstance(req, CompletionRequest):
        _check_sampling(req, caps)
        _check_chars("prompt", req.prompt, caps)
    elif isinstance(req, EmbeddingRequest):  # and PoolingRequest
        _check_chars("input", req.input, caps)
    elif isinstance(req, ScoreRequest):
        _check_chars("text_1", [req.text_1, req.text_2], caps)
    elif isinstance(req, TokenizeRequest):
        _check_chars("prompt", req.prompt or "", caps)
        _check_messages(req.messages, caps)
