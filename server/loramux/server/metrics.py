"""Prometheus metrics for the gRPC layer and the engine behind it.

Request series are labelled by tenant, adapter and status; with thousands of adapters
that would be thousands of series, so the first `max_labels` distinct adapters (and
tenants) keep their names and later ones are counted under "other". Engine and adapter
cache figures are read from the engine at scrape time by a custom collector, so the
engine itself never touches prometheus_client.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loramux.server.engine import Engine
from loramux.server.picker_metrics import PickerCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OTHER = "other"


class BoundedLabels:
    """Keeps the first `limit` distinct values; every later one becomes "other".

    Values in `always` (e.g. "base") keep their name and do not count against the limit.
    """

    def __init__(self, limit: int, always: tuple[str, ...] = ()) -> None:
        self.limit = limit
        self.always = frozenset(always)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self.always:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
            return OTHER


class EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.engine.stats()
        totals = self.engine.adapters.totals()
        memory = self.engine.adapters.memory()
        yield GaugeMetricFamily(
            "loramux_queue_depth", "Requests waiting for a batch row", stats.queued
        )
        yield GaugeMetricFamily(
            "loramux_running_batch_size", "Requests in the running batch", stats.running
        )
        yield CounterMetricFamily("loramux_engine_steps", "Engine loop steps", stats.steps)
        for name, value, doc in (
            (
                "loramux_adapter_cache_hits",
                totals.hits,
                "Requests that found their adapter in a device slot",
            ),
            (
                "loramux_adapter_cache_misses",
                totals.misses,
                "Requests that waited for an adapter load",
            ),
            ("loramux_adapter_loads", totals.loads, "Adapter loads from disk"),
            ("loramux_adapter_evictions", totals.evictions, "Adapter evictions from device slots"),
        ):
            yield CounterMetricFamily(name, doc, value)
        yield CounterMetricFamily(
            "loramux_adapter_load_seconds",
            "Total seconds spent loading adapters",
            totals.load_seconds_total,
        )
        yield GaugeMetricFamily(
            "loramux_adapter_last_load_seconds",
            "Duration of the latest adapter load",
            totals.last_load_seconds,
        )
        states = GaugeMetricFamily(
            "loramux_adapters", "Registered adapters by state", labels=["state"]
        )
        counts = {"stored": 0, "cpu": 0, "device": 0}
        for adapter in self.engine.adapters.stats().values():
            counts[adapter.state] = counts.get(adapter.state, 0) + 1
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states
        mem = GaugeMetricFamily("loramux_memory_bytes", "Memory held, by part", labels=["part"])
        mem.add_metric(["base_model"], stats.base_memory_bytes)
        mem.add_metric(["adapters_cpu"], memory["cpu_bytes"])
        mem.add_metric(["adapters_device_slots"], memory["device_slot_bytes"])
        mem.add_metric(["adapters_device_used"], memory["device_used_bytes"])
        mem.add_metric(["kv_cache"], stats.kv_cache_bytes)
        yield mem


class Metrics:
    """The server's series. The engine's figures join once `attach(engine)` is called, so
    the HTTP endpoint can be bound (and a taken port reported) before the model loads."""

    def __init__(self, engine: Engine | None = None, max_labels: int = 100) -> None:
        self.registry = CollectorRegistry()
        # Adapter labels are "owner/name" of adapters that exist (unresolvable names are
        # "unknown"), so callers cannot mint series by sending made-up names.
        self.adapter_label = BoundedLabels(max_labels, always=("base", "unknown"))
        self.tenant_label = BoundedLabels(max_labels)
        self.requests = Counter(
            "loramux_requests",
            "gRPC generation requests",
            ["tenant", "adapter", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "loramux_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "loramux_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "loramux_prompt_tokens", "Prompt tokens processed", ["tenant"], registry=self.registry
        )
        self.generated_tokens = Counter(
            "loramux_generated_tokens", "Tokens generated", ["tenant"], registry=self.registry
        )
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: Engine, model_name: str | None = None) -> None:
        """Add the engine's series and the llm-d picker's `vllm:*` series (picker_metrics)."""
        self.registry.register(EngineCollector(engine))
        self.registry.register(PickerCollector(engine, model_name or engine.info.base_model))

    def request_done(self, tenant: str, adapter: str, status: str) -> None:
        self.requests.labels(self.tenant_label(tenant), self.adapter_label(adapter), status).inc()

    def tokens(self, tenant: str, prompt: int, generated: int) -> None:
        label = self.tenant_label(tenant)
        self.prompt_tokens.labels(label).inc(prompt)
        self.generated_tokens.labels(label).inc(generated)

    def serve(self, host: str, port: int) -> object:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
