"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's extensions), on the engine's tokenizer."""

from __future__ import annotations

from typing import Any

from jaxserve.engine.interface import EngineInfo
from jaxserve.server.errors import OpenAIError
from jaxserve.server.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from jaxserve.server.requests import chat_prompt_text


def tokenize(req: TokenizeRequest, info: EngineInfo, chat_template: str | None = None) -> dict[str, Any]:
    """Token ids of a prompt, or of chat messages rendered with the chat template (``chat_template``:
    the server's ``--chat-template``)."""
    tok = info.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise OpenAIError(400, "send exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        chat = ChatCompletionRequest(
            messages=req.messages, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, chat_template_kwargs=req.chat_template_kwargs,
        )
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        text = chat_prompt_text(tok, chat, tools=tools, chat_template=chat_template)
        tokens = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
    else:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        tokens = tok.encode(req.prompt, add_special_tokens=add)
    return {"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens}


def detokenize(req: DetokenizeRequest, info: EngineInfo) -> dict[str, Any]:
    """The text of token ids (each id checked against the vocabulary)."""
    bad = next((t for t in req.tokens if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise OpenAIError(400, f"token id {bad} is out of range [0, {info.vocab_size})", param="tokens")
    return {"prompt": info.tokenizer.decode(req.tokens)}
