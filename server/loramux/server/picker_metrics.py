"""The model-server metrics an llm-d / Gateway API Inference Extension endpoint picker reads.

The picker scrapes each pod's Prometheus endpoint for series named as vLLM names them
(gateway-api-inference-extension, "Model Server Protocol"; llm-d-router,
plugin-metric-protocol):

- `vllm:num_requests_waiting`: requests queued for a batch row (gauge);
- `vllm:num_requests_running`: requests in the running batch (gauge);
- `vllm:kv_cache_usage_perc`: KV cache in use, a fraction in [0, 1] (gauge): blocks of the
  paged cache held by running requests over all its blocks (EngineStats.kv_blocks_used /
  kv_blocks_total; cached blocks nobody holds count as free, as vLLM counts them);
- `vllm:lora_requests_info`: a gauge whose value is the scrape's Unix time (the picker keeps
  the newest series by value) and whose labels are `max_lora` (device adapter slots,
  `--max-loaded-adapters`), `running_lora_adapters` (adapters in a device slot or used by a
  running request) and `waiting_lora_adapters` (adapters that queued requests wait for and
  that are not running), comma separated.

Adapters are named `owner/name`, the one name that means the same adapter to every caller
(its owner's and, for a public one, everyone's) and that the OpenAI API accepts in `model`:
the name the picker sees in a request is the name it finds here. Every series carries
`model_name`, the base model's id in the OpenAI API, as vLLM's do. `--metrics-labels hashed`
or `off` hash or leave out these adapter names too (`shown`), which the picker's LoRA
affinity then cannot match: keep `plain` where a picker routes by adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from loramux.server.engine import Engine, EngineStats


def adapter_name(engine_id: str) -> str:
    """`owner/name` of an engine id (`owner/name@digest`)."""
    return engine_id.partition("@")[0]


def _names(engine_ids: Iterable[str]) -> list[str]:
    return sorted({adapter_name(i) for i in engine_ids})


def _plain(names: list[str]) -> list[str]:
    return names


class PickerCollector(Collector):
    def __init__(
        self,
        engine: Engine,
        model_name: str,
        shown: Callable[[list[str]], list[str]] = _plain,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.shown = shown  # how adapter names appear (--metrics-labels)

    @staticmethod
    def kv_cache_usage(stats: EngineStats) -> float:
        if not stats.kv_blocks_total:
            return 0.0
        return stats.kv_blocks_used / stats.kv_blocks_total

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.engine.stats()
        labels = ["model_name"]
        for name, doc, value in (
            ("vllm:num_requests_waiting", "Requests waiting for a batch row", stats.queued),
            ("vllm:num_requests_running", "Requests in the running batch", stats.running),
            (
                "vllm:kv_cache_usage_perc",
                "KV cache in use, fraction in [0, 1]",
                self.kv_cache_usage(stats),
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self.model_name], value)
            yield family
        running_ids, waiting_ids = self.engine.adapter_demand()
        resident = [i for i, s in self.engine.adapters.stats().items() if s.state == "device"]
        running = _names([*resident, *running_ids])
        waiting = [n for n in _names(waiting_ids) if n not in running]
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "LoRA adapters running and waiting; the value is the time of this report",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric(
            [
                str(self.engine.settings.max_loaded_adapters),
                ",".join(self.shown(running)),
                ",".join(self.shown(waiting)),
            ],
            time.time(),
        )
        yield info
