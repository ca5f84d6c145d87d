"""Per-request latency and size histograms (vLLM's ``vllm:`` series, served as ``jaxserve:``).

Plain Python, no jax. ``RequestStats`` is fed by the one place each moment is decided: the
scheduler stamps a request's first scheduling, ``engine/step_results.StepResults`` its tokens and
its finish, ``LLMEngine.step`` the step time. The engine thread owns the histograms; a metrics
snapshot carries immutable copies (``HistogramSnapshot``) that ``/metrics`` renders. Buckets are
vLLM's (``vllm/v1/metrics/loggers.py``); the step-time buckets are ours (vLLM has no such series).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping

from jaxserve.request import Request

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def one_two_five_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's ``build_1_2_5_buckets``)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


@dataclasses.dataclass(frozen=True)
class HistogramSnapshot:
    """Per-bucket (not cumulative) counts; ``counts[-1]`` is the ``+Inf`` overflow bucket."""

    help: str
    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """A fixed-bucket histogram (upper bounds inclusive, as Prometheus' ``le``)."""

    def __init__(self, help: str, buckets: tuple[float, ...]) -> None:
        self.help = help
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.help, self.buckets, tuple(self.counts), self.total)


def histogram_specs(max_model_len: int) -> dict[str, tuple[str, tuple[float, ...]]]:
    """The latency and size histograms: name after the ``jaxserve:`` prefix -> (help text, buckets);
    ``max_model_len`` bounds the token-count buckets."""
    tokens = one_two_five_buckets(max_model_len)
    return {
        "time_to_first_token_seconds": ("Time from arrival to the first output token", TTFT_BUCKETS),
        "inter_token_latency_seconds": ("Time between consecutive output tokens", ITL_BUCKETS),
        "e2e_request_latency_seconds": ("Time from arrival to finish (finished requests)", REQUEST_LATENCY_BUCKETS),
        "request_queue_time_seconds": ("Time waiting before first scheduled", REQUEST_LATENCY_BUCKETS),
        "request_inference_time_seconds": ("Time from first scheduled to the last token", REQUEST_LATENCY_BUCKETS),
        "request_prefill_time_seconds": ("Time from first scheduled to the first token", REQUEST_LATENCY_BUCKETS),
        "request_decode_time_seconds": ("Time from the first token to the last", REQUEST_LATENCY_BUCKETS),
        "request_prompt_tokens": ("Prompt tokens per finished request", tokens),
        "request_generation_tokens": ("Generated tokens per finished request", tokens),
        "iteration_tokens_total": ("Tokens per engine step", ITERATION_TOKEN_BUCKETS),
        "engine_step_time_seconds": ("Wall time of one engine step call (jaxserve only)", STEP_BUCKETS),
    }


class RequestStats:
    """The engine's histograms, observed from request timestamps (``time.monotonic`` seconds)."""

    def __init__(self, max_model_len: int) -> None:
        self.histograms = {name: Histogram(doc, b) for name, (doc, b) in histogram_specs(max_model_len).items()}

    def _observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def on_token(self, req: Request, now: float) -> None:
        """``req`` received an output token at ``now`` (its first: TTFT; later ones: ITL)."""
        if req.first_token_time is None:
            req.first_token_time = now
            self._observe("time_to_first_token_seconds", now - req.arrival_time)
        else:
            self._observe("inter_token_latency_seconds", now - req.last_token_time)
        req.last_token_time = now

    def on_finish(self, req: Request, now: float) -> None:
        """``req`` finished (stop or length; aborted requests are not observed, as in vLLM)."""
        scheduled = req.first_scheduled_time if req.first_scheduled_time is not None else now
        first = req.first_token_time if req.first_token_time is not None else now
        last = req.last_token_time if req.last_token_time is not None else now
        self._observe("e2e_request_latency_seconds", now - req.arrival_time)
        self._observe("request_queue_time_seconds", scheduled - req.arrival_time)
        self._observe("request_inference_time_seconds", last - scheduled)
        self._observe("request_prefill_time_seconds", first - scheduled)
        self._observe("request_decode_time_seconds", last - first)
        self._observe("request_prompt_tokens", req.num_prompt_tokens)
        self._observe("request_generation_tokens", req.num_output_tokens)

    def on_dispatch(self, num_tokens: int) -> None:
        """A step of ``num_tokens`` tokens was dispatched."""
        self._observe("iteration_tokens_total", num_tokens)

    def on_step_time(self, seconds: float) -> None:
        """One ``LLMEngine.step`` call that ran a step took ``seconds``."""
        self._observe("engine_step_time_seconds", seconds)

    def snapshot(self) -> Mapping[str, HistogramSnapshot]:
        return {name: h.snapshot() for name, h in self.histograms.items()}
