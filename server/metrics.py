"""``GET /metrics``: Prometheus gauges, counters and histograms from the engine's latest metrics snapshot."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from jaxserve.engine.interface import EngineMetrics
from jaxserve.engine.request_stats import HistogramSnapshot


ModelSnapshot = tuple[bool, EngineMetrics | None, str]  # ready, the latest snapshot (None: none yet), name


class EngineCollector(Collector):
    """Turns each served model's ``EngineMetrics`` snapshot (published by its engine thread) into
    metric families, one series per model (label ``model_name``)."""

    def __init__(self, models: list[ModelSnapshot]) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        """Readiness per model; the rest only once an engine has published a snapshot."""
        labels = ["model_name"]
        ready = GaugeMetricFamily("jaxserve:engine_ready", "1 when the engine serves requests", labels=labels)
        for is_ready, _, name in self.models:
            ready.add_metric([name], 1.0 if is_ready else 0.0)
        yield ready
        snapshots = [(m, name) for _, m, name in self.models if m is not None]
        if not snapshots:
            return
        gauges = (
            ("num_requests_running", "Requests holding KV blocks", lambda m: m.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled", lambda m: m.num_waiting),
            ("kv_cache_used_blocks", "KV-cache blocks in use", lambda m: m.kv_used_blocks),
            ("kv_cache_total_blocks", "Usable KV-cache blocks", lambda m: m.kv_total_blocks),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use", lambda m: m.kv_used_blocks / m.kv_total_blocks),
            ("compiles_pending", "Step shapes still to compile in the background (--background-compile)",
             lambda m: m.compiles_pending),
        )
        counters = (
            ("num_preemptions", "Preemptions (blocks freed, recomputed later)", lambda m: m.num_preemptions),
            ("prompt_tokens", "Prompt tokens computed", lambda m: m.prompt_tokens),
            ("generation_tokens", "Tokens generated", lambda m: m.generation_tokens),
            ("request_success", "Requests finished (stop or length)", lambda m: m.requests_finished),
            ("request_aborted", "Requests aborted", lambda m: m.requests_aborted),
            ("engine_steps", "Engine steps run", lambda m: m.steps),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", lambda m: m.prefix_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache", lambda m: m.prefix_hits),
            ("compiles_while_serving", "XLA compiles on the engine thread since it became ready (should stay 0)",
             lambda m: m.compiles_while_serving),
            ("compile_waits", "Steps that waited for a background compile (--background-compile)",
             lambda m: m.compile_waits),
        )
        for family, table in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, doc, value in table:
                f = family(f"jaxserve:{name}", doc, labels=labels)
                for m, model in snapshots:
                    f.add_metric([model], float(value(m)))
                yield f
        yield from _histograms(snapshots)
        yield from _lora_families(snapshots)


def _histograms(snapshots: list[tuple[EngineMetrics, str]]) -> Iterator[HistogramMetricFamily]:
    """One family per histogram name in the snapshots (each model's engine has the same names)."""
    names = {name: h.help for m, _ in snapshots for name, h in m.histograms.items()}
    for name, doc in names.items():
        f = HistogramMetricFamily(f"jaxserve:{name}", doc, labels=["model_name"])
        for m, model in snapshots:
            h: HistogramSnapshot | None = m.histograms.get(name)
            if h is not None:
                f.add_metric([model], _cumulative(h), h.total)
        yield f


def _cumulative(h: HistogramSnapshot) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip([*map(str, h.buckets), "+Inf"], h.counts, strict=True):
        running += count
        out.append((bound, float(running)))
    return out


def _lora_families(snapshots: list[tuple[EngineMetrics, str]]) -> Iterator:
    """Running and waiting requests per LoRA adapter (label ``lora_name``; only models serving adapters)."""
    rows = [(model, row) for m, model in snapshots for row in m.lora_requests]
    if not rows:
        return
    for i, (name, doc) in enumerate((("lora_requests_running", "Running requests per LoRA adapter"),
                                     ("lora_requests_waiting", "Waiting requests per LoRA adapter")), start=1):
        f = GaugeMetricFamily(f"jaxserve:{name}", doc, labels=["model_name", "lora_name"])
        for model, row in rows:
            f.add_metric([model, row[0]], float(row[i]))
        yield f


def metrics_text(models: list[ModelSnapshot]) -> bytes:
    registry = CollectorRegistry()
    registry.register(EngineCollector(models))
    return generate_latest(registry)
