"""Prometheus metrics for the gRPC layer and the engine behind it.

Request series are labelled by tenant, adapter and status; with thousands of adapters
that would be thousands of series, so the first `max_labels` distinct adapters (and
tenants) keep their names and later ones are counted under "other"; `--metrics-labels`
hashes those names or drops the labels. Engine and adapter
cache figures are read from the engine at scrape time by a custom collector, so the
engine itself never touches prometheus_client.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from loramux.core.config import MetricsLabels
from loramux.server.constraints.compiler import COMPILE_BUCKETS
from loramux.server.constraints.masks import MASK_BUCKETS
from loramux.server.constraints.spec import ConstraintKind
from loramux.server.engine import Engine
from loramux.server.picker_metrics import PickerCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OTHER = "other"
METRICS_SALT = "metrics-label-salt"  # in the data dir: the key of hashed labels
HASH_HEX_CHARS = 12


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


class HashedLabels(BoundedLabels):
    """Like BoundedLabels, but each name becomes a keyed hash of it ("t-3f9c0a1b2d4e").

    The key is a random salt kept in the data dir, so series keep their label across
    restarts while someone who reads /metrics cannot test guessed tenant or adapter names.
    An operator maps a hash back with `label_for(name)` and the same salt.
    """

    def __init__(self, limit: int, salt: bytes, prefix: str, always: tuple[str, ...] = ()) -> None:
        super().__init__(limit, always)
        self.salt = salt
        self.prefix = prefix

    def label_for(self, value: str) -> str:
        digest = hmac.new(self.salt, value.encode(), hashlib.sha256).hexdigest()
        return f"{self.prefix}-{digest[:HASH_HEX_CHARS]}"

    def __call__(self, value: str) -> str:
        bounded = super().__call__(value)
        if bounded in self.always or bounded == OTHER:
            return bounded
        return self.label_for(bounded)


def metrics_salt(path: Path) -> bytes:
    """The data dir's label salt, made on first use (readable by the server's user only)."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


class EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(
        self,
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
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
        yield GaugeMetricFamily(
            "loramux_kv_cache_blocks_total", "KV cache blocks in the pool", stats.kv_blocks_total
        )
        yield GaugeMetricFamily(
            "loramux_kv_cache_blocks_used",
            "KV cache blocks held by running requests",
            stats.kv_blocks_used,
        )
        yield GaugeMetricFamily(
            "loramux_kv_cache_usage_ratio",
            "Fraction of the KV cache blocks held by running requests",
            stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0,
        )
        yield CounterMetricFamily(
            "loramux_preemptions",
            "Requests preempted to free KV blocks (recomputed later, no token lost)",
            stats.preemptions,
        )
        yield CounterMetricFamily(
            "loramux_prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values came from the prefix cache",
            stats.prefix_hit_tokens,
        )
        yield CounterMetricFamily(
            "loramux_prefill_tokens",
            "Tokens run through the model in prefill passes (prompts and recomputation)",
            stats.prefill_tokens_total,
        )
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
        # of those, in page-locked host memory (CUDA's --pinned-host-bytes; 0 on the CPU)
        mem.add_metric(["adapters_cpu_pinned"], memory["cpu_pinned_bytes"])
        mem.add_metric(["adapters_device_slots"], memory["device_slot_bytes"])
        mem.add_metric(["adapters_device_used"], memory["device_used_bytes"])
        mem.add_metric(["kv_cache"], stats.kv_cache_bytes)
        yield mem
        yield from _grammar_metrics(self.engine)


def _grammar_metrics(
    engine: Engine,
) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
    """Structured outputs: constrained requests by kind, grammar-cache hits, compile time,
    mask time per step."""
    grammars = engine.grammars.snapshot()
    kinds = CounterMetricFamily(
        "loramux_constrained_requests",
        "Requests with a structured-output constraint, by kind",
        labels=["kind"],
    )
    for kind in ConstraintKind:
        kinds.add_metric([kind.value], grammars.requests.get(kind.value, 0))
    yield kinds
    yield CounterMetricFamily(
        "loramux_grammar_cache_hits",
        "Constrained requests whose grammar was already compiled",
        grammars.cache_hits,
    )
    buckets = [
        (f"{bound:g}", count)
        for bound, count in zip(COMPILE_BUCKETS, grammars.compile_buckets, strict=True)
    ]
    yield HistogramMetricFamily(
        "loramux_grammar_compile_seconds",
        "Seconds to compile a structured-output constraint (cache misses)",
        buckets=[*buckets, ("+Inf", grammars.compiles)],
        sum_value=grammars.compile_seconds_sum,
    )
    masks = engine.masks.snapshot()
    mask_time = HistogramMetricFamily(
        "loramux_grammar_mask_seconds",
        "Seconds per decoding step on the constrained rows' token masks: `fill` writing "
        "them (on a helper thread during the forward pass, or at sampling for rows it did "
        "not fill), `sampling` what the step's sampling spent on them (waiting for the "
        "fill, filling the rest, applying)",
        labels=["part"],
    )
    for part, total, sums, counts in (
        ("fill", masks.fills, masks.fill_seconds_sum, masks.fill_buckets),
        ("sampling", masks.samplings, masks.sampling_seconds_sum, masks.sampling_buckets),
    ):
        cumulative = [
            (f"{bound:g}", count) for bound, count in zip(MASK_BUCKETS, counts, strict=True)
        ]
        mask_time.add_metric([part], [*cumulative, ("+Inf", total)], sums)
    yield mask_time


class Metrics:
    """The server's series. The engine's figures join once `attach(engine)` is called, so
    the HTTP endpoint can be bound (and a taken port reported) before the model loads.

    `labels` (--metrics-labels) says how tenant and adapter names appear: plain, hashed
    (`salt_file` keeps the key), or off (the series carry no tenant or adapter label).
    """

    def __init__(
        self,
        engine: Engine | None = None,
        max_labels: int = 100,
        *,
        labels: MetricsLabels = MetricsLabels.PLAIN,
        salt_file: Path | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.mode = MetricsLabels(labels)
        # Adapter labels are "owner/name" of adapters that exist (unresolvable names are
        # "unknown"), so callers cannot mint series by sending made-up names.
        always = ("base", "unknown")
        self.adapter_label: BoundedLabels = BoundedLabels(max_labels, always=always)
        self.tenant_label: BoundedLabels = BoundedLabels(max_labels)
        if self.mode is MetricsLabels.HASHED:
            if salt_file is None:
                raise ValueError("hashed metric labels need a salt file")
            salt = metrics_salt(salt_file)
            self.adapter_label = HashedLabels(max_labels, salt, "a", always=always)
            self.tenant_label = HashedLabels(max_labels, salt, "t")
        named = self.mode is not MetricsLabels.OFF
        self.requests = Counter(
            "loramux_requests",
            "Generation requests (gRPC and the HTTP API)",
            ["tenant", "adapter", "status"] if named else ["status"],
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
        tenant = ["tenant"] if named else []
        self.prompt_tokens = Counter(
            "loramux_prompt_tokens", "Prompt tokens processed", tenant, registry=self.registry
        )
        self.generated_tokens = Counter(
            "loramux_generated_tokens", "Tokens generated", tenant, registry=self.registry
        )
        # Per adapter version ("owner/name@v3"): what a canary is judged by beside the
        # version it replaces (requests and errors: `loramux_requests` by status).
        adapter = ["adapter"] if named else []
        self.adapter_tokens = Counter(
            "loramux_adapter_generated_tokens",
            "Tokens generated, by adapter version",
            adapter,
            registry=self.registry,
        )
        self.adapter_seconds = Histogram(
            "loramux_adapter_request_seconds",
            "Generation request duration (admission to last token), by adapter version",
            adapter,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: Engine, model_name: str | None = None) -> None:
        """Add the engine's series and the llm-d picker's `vllm:*` series (picker_metrics)."""
        self.registry.register(EngineCollector(engine))
        self.registry.register(
            PickerCollector(engine, model_name or engine.info.base_model, self._adapter_names)
        )

    def _adapter_names(self, names: list[str]) -> list[str]:
        """Adapter names in label values that are lists (the picker's series), per mode."""
        if self.mode is MetricsLabels.OFF:
            return []
        if isinstance(self.adapter_label, HashedLabels):
            return [self.adapter_label.label_for(n) for n in names]
        return names

    def request_done(self, tenant: str, adapter: str, status: str, seconds: float) -> None:
        if self.mode is MetricsLabels.OFF:
            self.requests.labels(status).inc()
            self.adapter_seconds.observe(seconds)
            return
        label = self.adapter_label(adapter)
        self.requests.labels(self.tenant_label(tenant), label, status).inc()
        self.adapter_seconds.labels(label).observe(seconds)

    def tokens(self, tenant: str, adapter: str, prompt: int, generated: int) -> None:
        if self.mode is MetricsLabels.OFF:  # a counter without labels takes no .labels()
            self.prompt_tokens.inc(prompt)
            self.generated_tokens.inc(generated)
            self.adapter_tokens.inc(generated)
            return
        label = self.tenant_label(tenant)
        self.prompt_tokens.labels(label).inc(prompt)
        self.generated_tokens.labels(label).inc(generated)
        self.adapter_tokens.labels(self.adapter_label(adapter)).inc(generated)

    def serve(self, host: str, port: int) -> object:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
