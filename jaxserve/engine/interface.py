"""What a client of the engine sees: read-only info, metric snapshots, and admission.

Admission is the one validation of a request (prompt, token ids, length against
``max_model_len``) and the one queue rule; it runs before anything is queued, so a bad or
refused request gets its HTTP status before any stream starts. Everything here reads constants
or snapshots, so any thread may call it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from jaxserve.engine.grammar import CompiledGrammar, GrammarCompiler
from jaxserve.engine.request_stats import HistogramSnapshot
from jaxserve.sampling_params import SamplingParamError, SamplingParams
from jaxserve.tokenizer import Tokenizer


class PromptTooLongError(SamplingParamError):
    """Prompt + max_tokens exceed max_model_len (the message states both numbers)."""


class QueueFullError(RuntimeError):
    """More requests would be waiting than ``max_queue_size`` allows."""


class RequestFailedError(RuntimeError):
    """An internal fault ended this request alone (the engine serves the others): a 500, never bad input."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve (still loading, failed start-up or crashed loop)."""


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """Constants of a started engine (the tokenizer is only read: encode, decode, templates)."""

    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int  # KV positions the whole cache holds: no request may need more
    default_sampling: Mapping[str, Any]  # generation_config.json's sampling defaults
    grammars: GrammarCompiler | None = None  # structured outputs (thread-safe; None: not supported)


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of the engine's gauges and counters, published by the engine thread."""

    num_running: int
    num_waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    requests_finished: int
    requests_aborted: int
    steps: int
    prefix_queries: int
    prefix_hits: int
    compiles_while_serving: int = 0  # XLA compiles on the engine's thread since it became ready
    compiles_pending: int = 0  # step shapes the background compiler has still to compile
    compile_waits: int = 0  # steps that waited for a background compile (no ready shape held them)
    histograms: Mapping[str, HistogramSnapshot] = dataclasses.field(default_factory=dict)
    lora_requests: tuple[tuple[str, int, int], ...] = ()  # per served LoRA adapter: (name, running, waiting)


@dataclasses.dataclass(frozen=True)
class AdmittedRequest:
    """A validated request: the engine queues it without checking it again."""

    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: the request's own or what max_model_len leaves
    grammar: CompiledGrammar | None = None  # params.structured, compiled (None: the engine compiles it)
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)  # when admitted (latency histograms)
    lora_id: int = 0  # the LoRA adapter it runs with (engine/lora_slots.py); 0: the base model


def _check_ids(param: str, ids: Any, vocab: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise SamplingParamError(param, f"token id {bad} is out of range [0, {vocab})")


def admit(prompt_token_ids: list[int], params: SamplingParams, info: EngineInfo) -> AdmittedRequest:
    """Validate one request against the engine's limits (SamplingParamError names the field)."""
    n, limit = len(prompt_token_ids), info.max_model_len
    if n == 0:
        raise SamplingParamError("prompt", "the prompt is empty")
    _check_ids("prompt", prompt_token_ids, info.vocab_size)
    _check_ids("stop_token_ids", params.stop_token_ids, info.vocab_size)
    _check_ids("logit_bias", (t for t, _ in params.logit_bias), info.vocab_size)
    room = limit - n
    if params.max_tokens is None:
        if room < 1:
            raise PromptTooLongError(
                "messages", f"This model's maximum context length is {limit} tokens, "
                f"but the prompt has {n} tokens, which leaves no room for output."
            )
        return _fits_cache(AdmittedRequest(list(prompt_token_ids), params, room), info)
    if params.max_tokens > room:
        raise PromptTooLongError(
            "max_tokens", f"This model's maximum context length is {limit} tokens. "
            f"However, you requested {n + params.max_tokens} tokens ({n} in the prompt, "
            f"{params.max_tokens} for the completion). Please reduce the prompt or max_tokens."
        )
    return _fits_cache(AdmittedRequest(list(prompt_token_ids), params, params.max_tokens), info)


def _fits_cache(req: AdmittedRequest, info: EngineInfo) -> AdmittedRequest:
    need = len(req.prompt_token_ids) + req.max_tokens
    if need > info.kv_capacity_tokens:
        raise SamplingParamError(
            "max_tokens", f"request needs {need} KV positions but the cache holds {info.kv_capacity_tokens}"
        )
    return req


def check_queue(num_waiting: int, num_new: int, max_queue_size: int | None) -> None:
    """The queue rule: ``num_new`` more requests may wait only if the total stays within the limit."""
    if max_queue_size is not None and num_waiting + num_new > max_queue_size:
        raise QueueFullError(
            f"the server is busy: {num_waiting} requests are already waiting (limit {max_queue_size})"
        )
