"""Issue 7.5: a bounded soak on 127.0.0.1: tens of streams over many adapters, with uploads,
loads, unloads and deletes going on while generating.

Every completed greedy request must give exactly the tokens it gives when run alone; the
only errors allowed are the expected ones (tenant quota, and NOT_FOUND for requests that
name an adapter being deleted under them); the server's resident memory must stay flat
after a warm-up (start and end are printed); and the data dir must be consistent after.
LORAMUX_SOAK_SECONDS sets the length of the loaded phase (default 60).
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from api_helpers import ServerProcess
from hardening_helpers import (
    ADMIN_KEY,
    Answer,
    assert_consistent,
    call,
    generate_request,
    read_folder,
    stream_call,
    stubs,
    upload_requests,
)

from loramux.core.models import ResolvedModel
from loramux.server.adapters import LinearShape
from loramux.server.lora import base_linear_shapes
from loramux.server.synthetic import write_random_adapter
from loramux.v1 import loramux_pb2 as pb

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("LORAMUX_SOAK_SECONDS", "60"))
WARM_UP_FRACTION = 0.3  # memory is compared from the end of the warm-up on
RSS_TOLERANCE = 10 << 20  # growth after warm-up; a leak of ~50 bytes per tensor load exceeds it
TENANTS = ("acme", "globex", "initech")
STABLE_ADAPTERS = 4  # per tenant: 12 in all, for 4 device slots and 6 CPU places
WORKERS_PER_TENANT = 8  # 24 concurrent streams
LENGTHS = (4, 8, 16)
PROMPTS = ("The soak test begins", "Many adapters, one model", "What is the capital of France?")
OK = grpc.StatusCode.OK
# Expected under load: the tenant's concurrency quota, and a request for a churn adapter
# that is deleted before the request reaches it.
EXPECTED = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}


@dataclass
class Tally:
    """What the load threads saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    completed: int = 0
    compared: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def record(self, what: str, answer: Answer, allowed: set[grpc.StatusCode]) -> None:
        with self.lock:
            self.codes[f"{what}:{answer.code.name}"] += 1
            if answer.code != OK and answer.code not in allowed:
                self.unexpected.append(f"{what}: {answer.code.name} {answer.details}")


def _linears(tiny: ResolvedModel) -> dict[str, LinearShape]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tiny.path)))
    return base_linear_shapes(skeleton)


@pytest.fixture(scope="module")
def server(
    tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("soak") / "home"
    home.mkdir()
    args = (
        "--base-model", str(tiny_llama.path), "--device", "cpu", "--lora-kernel", "eager",
        "--admin-keys", ADMIN_KEY, "--max-loaded-adapters", "4", "--max-cpu-adapters", "6",
        "--max-batch-size", "16", "--max-new-tokens-limit", "32",
        "--tenant-max-concurrent", "6", "--tenant-max-queued", "3",
    )  # fmt: skip
    process = ServerProcess(home, *args).start()
    yield process
    process.stop()


def test_soak(server: ServerProcess, tiny_llama: ResolvedModel, tmp_path: Path) -> None:
    channel, inference, adapters, admin = stubs(server.address)
    keys = {}
    for tenant in TENANTS:
        assert call(admin.CreateTenant, pb.CreateTenantRequest(name=tenant), ADMIN_KEY).code == OK
        keys[tenant] = call(
            admin.CreateKey, pb.CreateKeyRequest(tenant=tenant), ADMIN_KEY
        ).response.key
    linears = _linears(tiny_llama)
    stable: dict[str, list[str]] = {}
    for t, tenant in enumerate(TENANTS):
        stable[tenant] = [f"stable-{i}" for i in range(STABLE_ADAPTERS)]
        for i, name in enumerate(stable[tenant]):
            folder = write_random_adapter(
                tmp_path / tenant / name,
                linears,
                rank=(4, 8, 16)[i % 3],
                seed=10 * t + i,
                scale=0.3,
            )
            answer = call(
                adapters.UploadAdapter,
                iter(upload_requests(name, read_folder(folder))),
                keys[tenant],
            )
            assert answer.code == OK, answer.details

    # Each (tenant, adapter, prompt) alone, one at a time: the reference outputs.
    reference: dict[tuple[str, str, str], list[int]] = {}
    for tenant in TENANTS:
        for adapter in ("", *stable[tenant]):
            for prompt in PROMPTS:
                answer = call(
                    inference.Generate,
                    generate_request(prompt, adapter, max(LENGTHS)),
                    keys[tenant],
                )
                assert answer.code == OK, answer.details
                reference[tenant, adapter, prompt] = list(answer.response.token_ids)

    tally = Tally()
    stop = threading.Event()
    process = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
    samples: list[tuple[float, int]] = []

    def generate_loop(tenant: str, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            adapter = rng.choice(("", *stable[tenant]))
            prompt, length = rng.choice(PROMPTS), rng.choice(LENGTHS)
            request = generate_request(prompt, adapter, length)
            if rng.random() < 0.5:
                answer = call(inference.Generate, request, keys[tenant], timeout=120)
                tokens = list(answer.response.token_ids) if answer.code == OK else []
            else:
                answer = stream_call(inference.GenerateStream, request, keys[tenant], timeout=120)
                tokens = (
                    [t for m in answer.response for t in m.token_ids] if answer.code == OK else []
                )
            tally.record("generate", answer, {grpc.StatusCode.RESOURCE_EXHAUSTED})
            if answer.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                stop.wait(0.05)  # over the tenant's quota: back off, as a client would
            if answer.code == OK:
                with tally.lock:
                    tally.completed += 1
                    tally.compared += 1
                    expected = reference[tenant, adapter, prompt][:length]
                    if tokens != expected:
                        tally.mismatches.append(
                            f"{tenant}/{adapter or 'base'} {prompt!r}: {tokens} != {expected}"
                        )

    def churn_request(tenant: str, name: str) -> None:
        request = generate_request("churn", name, 8)
        tally.record("generate-churn", call(inference.Generate, request, keys[tenant]), EXPECTED)

    def churn_loop(tenant: str, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not stop.is_set():
            n += 1
            name = f"churn-{n}"
            folder = write_random_adapter(
                tmp_path / tenant / name, linears, rank=8, seed=1000 + seed * 100 + n, scale=0.3
            )
            upload = call(
                adapters.UploadAdapter,
                iter(upload_requests(name, read_folder(folder))),
                keys[tenant],
            )
            tally.record("upload", upload, set())
            # A request on the churn adapter racing its deletion: OK or NOT_FOUND.
            racing = threading.Thread(target=churn_request, args=(tenant, name))
            racing.start()
            target = rng.choice(stable[tenant])
            tally.record(
                "load", call(adapters.LoadAdapter, pb.AdapterRef(name=target), keys[tenant]), set()
            )
            target = rng.choice(stable[tenant])
            tally.record(
                "unload",
                call(adapters.UnloadAdapter, pb.AdapterRef(name=target), keys[tenant]),
                set(),
            )
            tally.record(
                "delete",
                call(adapters.DeleteAdapter, pb.AdapterRef(name=name), keys[tenant]),
                set(),
            )
            racing.join(60)

    def watch_memory() -> None:
        started = time.monotonic()
        while not stop.wait(1.0):
            samples.append((time.monotonic() - started, process.memory_info().rss))

    threads: list[threading.Thread] = [threading.Thread(target=watch_memory)]
    for t, tenant in enumerate(TENANTS):
        threads += [
            threading.Thread(target=generate_loop, args=(tenant, 100 * t + w))
            for w in range(WORKERS_PER_TENANT)
        ]
        threads.append(threading.Thread(target=churn_loop, args=(tenant, t)))
    rss_start = process.memory_info().rss
    for thread in threads:
        thread.start()
    time.sleep(SOAK_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(180)
    assert not any(thread.is_alive() for thread in threads), "a load thread hung"
    rss_end = process.memory_info().rss
    # Growth after the warm-up: medians of its first and last thirds (robust to spikes).
    after = [rss for at, rss in samples if at >= WARM_UP_FRACTION * SOAK_SECONDS]
    third = max(1, len(after) // 3)
    early, late = statistics.median(after[:third]), statistics.median(after[-third:])
    mib = 1 << 20
    peak = max((rss for _, rss in samples), default=rss_end)
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s: {tally.completed} generations compared, {dict(tally.codes)}"
    )
    print(
        f"server RSS: start {rss_start / mib:.0f} MiB, after warm-up {early / mib:.0f} MiB, "
        f"at the end of the load {late / mib:.0f} MiB, peak {peak / mib:.0f} MiB, "
        f"idle after {rss_end / mib:.0f} MiB (growth allowed {RSS_TOLERANCE // mib} MiB)"
    )

    assert tally.unexpected == [], tally.unexpected[:10]
    assert tally.mismatches == [], tally.mismatches[:10]
    assert tally.completed >= 10 * len(TENANTS) * WORKERS_PER_TENANT // 2, tally.completed
    assert tally.codes["delete:OK"] >= len(TENANTS), tally.codes
    assert late - early <= RSS_TOLERANCE
    # Afterwards: the stable adapters are all there, the churn ones all gone, nothing left over.
    for tenant in TENANTS:
        listed = call(adapters.ListAdapters, pb.ListAdaptersRequest(), keys[tenant])
        assert sorted(a.name for a in listed.response.adapters) == stable[tenant]
    assert_consistent(server.home)
    log = server.log.read_text()
    assert "Traceback" not in log and "engine step failed" not in log
    channel.close()
