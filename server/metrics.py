"""``GET /metrics``: Prometheus gauges and counters read from the engine at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxserve.engine.async_engine import AsyncEngine


class EngineCollector(Collector):
    """Reads scheduler and block-manager counters (plain ints, safe to read from another thread)."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator:
        labels = ["model_name"]
        ready = GaugeMetricFamily("jaxserve:engine_ready", "1 when the engine serves requests", labels=labels)
        ready.add_metric([self.model_name], 1.0 if self.engine.is_ready else 0.0)
        yield ready
        llm = self.engine.engine
        if llm is None:
            return
        s, bm, st = llm.scheduler, llm.scheduler.block_manager, llm.counters
        for name, doc, value in (
            ("num_requests_running", "Requests holding KV blocks", len(s.running)),
            ("num_requests_waiting", "Requests waiting to be scheduled", len(s.waiting)),
            ("kv_cache_used_blocks", "KV-cache blocks in use", bm.num_used_blocks),
            ("kv_cache_total_blocks", "Usable KV-cache blocks", bm.num_usable_blocks),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use", bm.num_used_blocks / bm.num_usable_blocks),
        ):
            g = GaugeMetricFamily(f"jaxserve:{name}", doc, labels=labels)
            g.add_metric([self.model_name], float(value))
            yield g
        for name, doc, value in (
            ("num_preemptions", "Preemptions (blocks freed, recomputed later)", s.num_preemptions),
            ("prompt_tokens", "Prompt tokens computed", st.prompt_tokens),
            ("generation_tokens", "Tokens generated", st.generation_tokens),
            ("request_success", "Requests finished (stop or length)", st.requests_finished),
            ("request_aborted", "Requests aborted", st.requests_aborted),
            ("engine_steps", "Engine steps run", st.steps),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", bm.prefix_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache", bm.prefix_hits),
        ):
            c = CounterMetricFamily(f"jaxserve:{name}", doc, labels=labels)
            c.add_metric([self.model_name], float(value))
            yield c


def metrics_text(engine: AsyncEngine, model_name: str) -> bytes:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, model_name))
    return generate_latest(registry)
