"""Host-side state of one sequence as the scheduler sees it (plain Python, no jax)."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Protocol

from jaxserve.sampling_params import SamplingParams

PLACEHOLDER = -1  # an output token sampled by a step whose result has not reached the host yet
NO_TOKEN = -2  # sampled from a row whose grammar mask (with min_tokens' bias) allowed no token


class Grammar(Protocol):
    """A request's grammar state as the host sees it (``engine/grammar.GrammarMatcher``)."""

    def consume(self, token: int) -> bool: ...

    @property
    def done(self) -> bool: ...

    @property
    def error(self) -> str: ...


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"  # holds KV blocks, scheduled every step
    FINISHED_STOPPED = "stop"  # EOS / stop token / stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"  # client went away or the request was cancelled

    @property
    def finished(self) -> bool:
        """Whether the request has ended (stopped, hit its length, or was aborted)."""
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclasses.dataclass(frozen=True)
class Finish:
    """How a request ended (``engine/step_results.decide_finish`` decides it)."""

    status: RequestStatus
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


class Request:
    """Tokens of one sequence and how many of them already have KV in the cache.

    Invariant: ``num_computed_tokens <= num_tokens``. A step computes the next
    ``num_tokens - num_computed_tokens`` tokens (possibly a chunk of them); when it reaches
    ``num_tokens`` the step's sampled token is appended, first as ``PLACEHOLDER`` while the step
    runs (so the next step can be scheduled), then resolved to its value. Preemption resets
    ``num_computed_tokens`` to 0 (the KV is recomputed later from prompt + outputs).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        max_tokens: int,
        eos_token_ids: tuple[int, ...] = (),
        seed: int = 0,
        arrival_time: float | None = None,
        lora_id: int = 0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.max_tokens = max_tokens  # resolved (never None)
        self.eos_token_ids = eos_token_ids
        self.seed = seed  # the sampling seed: params.seed, or one the engine drew
        self.lora_id = lora_id  # the LoRA adapter it runs with (engine/lora_slots.py); 0: the base model
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_registered_blocks = 0  # leading blocks already in the prefix cache
        self.num_pending = 0  # PLACEHOLDER outputs (at the end of output_token_ids)
        self.num_preemptions = 0
        self.grammar: Grammar | None = None  # structured outputs: consumes each resolved output token
        # time.monotonic() moments for the latency histograms (engine/request_stats.py)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None  # set by the scheduler when first admitted
        self.first_token_time: float | None = None  # set when the first output token reaches the host
        self.last_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens ``[start, stop)`` of prompt + outputs (the same as ``token_at`` over the range)."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose values the host knows (all but the trailing placeholders)."""
        return self.num_tokens - self.num_pending

    @property
    def prefill_only(self) -> bool:
        """An embedding (``max_tokens`` 0): its prompt is computed, never sampled from."""
        return self.max_tokens == 0

    @property
    def reached_max_tokens(self) -> bool:
        """Schedule no more steps: every output slot is taken (some may still be in flight), or a
        prefill-only request's prompt is all computed (its last chunk may still be in flight)."""
        if self.prefill_only:
            return self.num_computed_tokens >= self.num_tokens
        return len(self.output_token_ids) >= self.max_tokens

    def add_placeholder(self) -> int:
        """Reserve the next output slot for a token being sampled; returns its index."""
        self.output_token_ids.append(PLACEHOLDER)
        self.num_pending += 1
        return len(self.output_token_ids) - 1

    def truncate_outputs(self, n: int) -> None:
        """Keep only the first ``n`` outputs (drops tokens sampled after the sequence finished)."""
        del self.output_token_ids[n:]
        self.num_pending = sum(1 for t in self.output_token_ids if t == PLACEHOLDER)

    def resolve_output(self, index: int, token_id: int) -> None:
        """Fill output slot ``index`` (a PLACEHOLDER) with the sampled token."""
        self.output_token_ids[index] = token_id
        self.num_pending -= 1

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
