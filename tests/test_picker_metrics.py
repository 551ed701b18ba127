"""Issue 14 point 2: /metrics speaks the llm-d / Inference Extension model-server protocol.

A real server (tiny random Llama, one batch row, one adapter slot) is put into a known
state: adapter `a` generating, a request for adapter `b` queued behind it (the engine
paused between steps, so nothing moves while we look). /metrics is then read the way the
endpoint picker reads it: Prometheus text format, families by name, and for
`vllm:lora_requests_info` the newest series by value, its adapter lists split on commas.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from api_helpers import eventually, free_port, linear_shapes
from prometheus_client.parser import text_string_to_metric_families

from loramux.client import LoramuxClient
from loramux.core.config import Settings
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer, start_server
from loramux.server.synthetic import write_random_adapter

MODEL = "tiny-base"


@pytest.fixture(scope="module")
def server(
    tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("picker-home")
    settings = Settings(
        home=home,
        base_model=str(tiny_llama.path),
        device="cpu",
        port=0,
        metrics_port=free_port(),
        http_port=free_port(),
        served_model_name=MODEL,
        lora_kernel="eager",
        max_batch_size=1,
        max_loaded_adapters=1,
        max_cpu_adapters=2,
        dev=True,
    )
    running = start_server(settings)  # --dev: every caller is tenant `default`
    shapes = linear_shapes(tiny_llama.path)
    with LoramuxClient(f"127.0.0.1:{running.port}") as client:
        for seed, name in enumerate(("a", "b")):
            folder = write_random_adapter(
                home / "src" / name, shapes, rank=4, alpha=8, seed=seed, scale=0.2
            )
            client.upload_adapter(folder, name)
    yield running
    running.close()


def scrape(server: RunningServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every family of /metrics as the picker parses it: name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
        text = reply.read().decode()
    return {
        family.name: [(dict(s.labels), s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def gauge(families: dict, name: str) -> float:
    ((labels, value),) = families[name]
    assert labels == {"model_name": MODEL}
    return float(value)


def lora_info(families: dict) -> tuple[dict[str, str], float]:
    """The newest `vllm:lora_requests_info` series (largest value), as the picker picks it."""
    return max(families["vllm:lora_requests_info"], key=lambda series: series[1])


def adapters(label: str) -> list[str]:
    return [name.strip() for name in label.split(",") if name.strip()]


def test_idle_server_reports_nothing_running(server: RunningServer) -> None:
    before = time.time()
    families = scrape(server)
    assert gauge(families, "vllm:num_requests_waiting") == 0
    assert gauge(families, "vllm:num_requests_running") == 0
    assert gauge(families, "vllm:kv_cache_usage_perc") == 0
    labels, stamp = lora_info(families)
    assert labels["max_lora"] == "1"
    assert adapters(labels["waiting_lora_adapters"]) == []
    assert before <= stamp <= time.time()


def test_running_and_waiting_adapters_as_the_picker_sees_them(server: RunningServer) -> None:
    assert server.http is not None
    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http.port}/v1", api_key="none", max_retries=0
    )
    engine = server.state.engine
    # Adapter `a` generates (a long answer, so it is still running when we look).
    stream = api.completions.create(
        model="a", prompt="Count:", max_tokens=300, extra_body={"ignore_eos": True}, stream=True
    )
    next(iter(stream))
    paused, release = threading.Event(), threading.Event()

    def hold_engine() -> None:
        paused.set()
        release.wait(60)

    holder = threading.Thread(target=lambda: engine.run_on_engine_thread(hold_engine))
    holder.start()
    waiter = threading.Thread(
        target=lambda: api.completions.create(model="default/b", prompt="Hi", max_tokens=2)
    )
    try:
        assert paused.wait(60)
        waiter.start()
        assert eventually(lambda: engine.stats().queued == 1)
        families = scrape(server)
        held = engine.stats()  # the engine is paused: the same figures the scrape saw
    finally:
        release.set()
        holder.join(60)
        stream.close()
    waiter.join(60)
    assert gauge(families, "vllm:num_requests_running") == 1
    assert gauge(families, "vllm:num_requests_waiting") == 1
    # KV blocks the running request holds over the pool (paged cache, docs/engine.md).
    assert 0 < held.kv_blocks_used < held.kv_blocks_total
    assert gauge(families, "vllm:kv_cache_usage_perc") == held.kv_blocks_used / held.kv_blocks_total
    labels, _ = lora_info(families)
    assert labels["max_lora"] == "1"
    # Names as a router puts them in `model`: `owner/name` is accepted from any caller that
    # may use the adapter.
    assert adapters(labels["running_lora_adapters"]) == ["default/a"]
    assert adapters(labels["waiting_lora_adapters"]) == ["default/b"]
    # The loramux_* series are still there beside the vllm:* ones.
    assert "loramux_queue_depth" in scrape(server)
