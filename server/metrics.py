"""``GET /metrics``: Prometheus gauges and counters from the engine's latest metrics snapshot."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxserve.engine.interface import EngineMetrics


class EngineCollector(Collector):
    """Turns one ``EngineMetrics`` snapshot (published by the engine thread) into metric families."""

    def __init__(self, ready: bool, m: EngineMetrics | None, model_name: str) -> None:
        self.ready, self.m, self.model_name = ready, m, model_name

    def collect(self) -> Iterator:
        labels = ["model_name"]
        ready = GaugeMetricFamily("jaxserve:engine_ready", "1 when the engine serves requests", labels=labels)
        ready.add_metric([self.model_name], 1.0 if self.ready else 0.0)
        yield ready
        m = self.m
        if m is None:
            return
        for name, doc, value in (
            ("num_requests_running", "Requests holding KV blocks", m.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled", m.num_waiting),
            ("kv_cache_used_blocks", "KV-cache blocks in use", m.kv_used_blocks),
            ("kv_cache_total_blocks", "Usable KV-cache blocks", m.kv_total_blocks),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use", m.kv_used_blocks / m.kv_total_blocks),
        ):
            g = GaugeMetricFamily(f"jaxserve:{name}", doc, labels=labels)
            g.add_metric([self.model_name], float(value))
            yield g
        for name, doc, value in (
            ("num_preemptions", "Preemptions (blocks freed, recomputed later)", m.num_preemptions),
            ("prompt_tokens", "Prompt tokens computed", m.prompt_tokens),
            ("generation_tokens", "Tokens generated", m.generation_tokens),
            ("request_success", "Requests finished (stop or length)", m.requests_finished),
            ("request_aborted", "Requests aborted", m.requests_aborted),
            ("engine_steps", "Engine steps run", m.steps),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", m.prefix_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache", m.prefix_hits),
        ):
            c = CounterMetricFamily(f"jaxserve:{name}", doc, labels=labels)
            c.add_metric([self.model_name], float(value))
            yield c


def metrics_text(ready: bool, m: EngineMetrics | None, model_name: str) -> bytes:
    registry = CollectorRegistry()
    registry.register(EngineCollector(ready, m, model_name))
    return generate_latest(registry)
