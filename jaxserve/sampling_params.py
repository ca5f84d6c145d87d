"""Per-request sampling settings, validated once at construction (ValueError naming the field)."""

from __future__ import annotations

import dataclasses

MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's top_logprobs limit)


class SamplingParamError(ValueError):
    """A sampling parameter is out of range; ``param`` names it (the HTTP layer reports it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output's text (compiled by ``engine/grammar.py``); hashable: the cache key.

    ``spec``: the JSON schema as canonical JSON (``json_schema``), the regex, the choices as a JSON
    list (``choice``), the Lark or GBNF text (``grammar``); empty for ``json_object``.
    """

    kind: str
    spec: str = ""
    param: str = dataclasses.field(default="structured_outputs", compare=False)  # the request field (errors)

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise SamplingParamError("structured_outputs", f"unknown structured output kind {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one sequence.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` and ``min_p == 0`` disable
    those filters. ``seed`` makes sampling reproducible whatever else is in the batch.
    """

    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # stop strings; the matched text is cut from the output
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs added to the logits
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k
    structured: StructuredOutput | None = None  # the output must match this grammar

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamError("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise SamplingParamError("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamError(
                "min_tokens", f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingParamError("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise SamplingParamError("top_k", f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise SamplingParamError(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise SamplingParamError(
                "repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingParamError("logit_bias", f"logit_bias has more than {MAX_LOGIT_BIAS} entries")
        for tid, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise SamplingParamError("logit_bias", f"logit_bias values must be in [-100, 100], got {bias}")
            if tid < 0:
                raise SamplingParamError("logit_bias", f"logit_bias token id {tid} is negative")
        if len(self.stop_token_ids) > 63:
            raise SamplingParamError("stop_token_ids", "at most 63 stop_token_ids are supported")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingParamError("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise SamplingParamError("stop", "stop strings must not be empty")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise SamplingParamError("seed", f"seed must fit in 64 bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalties: the next token depends on the token history."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
