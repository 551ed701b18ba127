"""Availability is isolated per tenant (issue 11, point 3).

One tenant flooding the server must not crowd out the others: each tenant may have at most
`--tenant-max-calls` calls in flight (half of `--grpc-workers` by default), the rest are
refused at once with RESOURCE_EXHAUSTED naming the flag, and another tenant's request and
the health service are served. (A call waiting for a slot or streaming to a client that
does not read holds no thread since grpc.aio, tests/test_grpc_streams.py; under the
thread-per-call server before, the cap is what left threads for the others.) Queued
requests that are cancelled or past their deadline leave the engine's queue at once, also
behind a full batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from api_helpers import eventually, health_status
from grpc_health.v1 import health_pb2
from hardening_helpers import create_tenants, stubs, tiny_server

from loramux.core.config import Settings
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.app import RunningServer
from loramux.server.engine import Engine
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from loramux.v1 import loramux_pb2 as pb

WORKERS = 8
FLOOD = 40  # concurrent streams of the flooding tenant, 5x the worker pool
LONG = 400  # tokens each flooding stream asks for (it keeps its slot meanwhile)


@pytest.fixture
def server(home: Path, tiny_llama: ResolvedModel) -> Iterator[RunningServer]:
    running = tiny_server(
        home,
        tiny_llama,
        grpc_workers=WORKERS,  # --tenant-max-calls defaults to half: 4
        tenant_max_concurrent=2,
        tenant_max_queued=16,  # with 2 running: the cap, not the line, refuses the flood
        max_new_tokens_limit=LONG,
        max_batch_size=4,
    )
    yield running
    running.close()


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def test_one_tenant_flooding_leaves_room_for_others_and_health(server: RunningServer) -> None:
    address = f"127.0.0.1:{server.port}"
    channel, inference, _, admin = stubs(address)
    keys = create_tenants(admin, ["flood", "calm"])
    flood = [
        # Slow readers: nobody ever reads these streams.
        inference.GenerateStream(
            _request("flood the server", LONG), metadata=_bearer(keys["flood"]), timeout=300
        )
        for _ in range(FLOOD)
    ]
    try:
        gate = server.state.gate
        assert eventually(lambda: gate.in_flight().get("flood") == 2)
        assert eventually(lambda: gate.waiting().get("flood", 0) >= 1)

        assert health_status(address, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
        answer = inference.Generate(
            _request("a calm question", 8), metadata=_bearer(keys["calm"]), timeout=60
        )
        assert len(answer.token_ids) == 8
        assert health_status(address, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING

        assert gate.calls().get("flood", 0) <= server.state.settings.calls_per_tenant < WORKERS
        refused = [call for call in flood if _refused(call)]
        assert refused, "the calls over the tenant's cap should be refused at once"
        assert "--tenant-max-calls" in (refused[0].details() or "")
    finally:
        for call in flood:
            call.cancel()
        channel.close()
    assert eventually(lambda: server.state.inflight == 0)


def _refused(call: Any) -> bool:
    return bool(call.done() and call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)


def _request(prompt: str, tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_new_tokens=tokens, ignore_eos=True)


# ---- the engine's queue, behind a full batch ----


@pytest.fixture(scope="module")
def engine(tiny_llama: ResolvedModel) -> Iterator[Engine]:
    engine = Engine(
        load_base_model(tiny_llama, "nf4", "cpu"),
        load_tokenizer(tiny_llama),
        Settings(max_new_tokens_limit=LONG, max_batch_size=1),  # one row: always full
        tiny_llama,
        lora_kernel="eager",
    )
    yield engine
    engine.shutdown()


class Reader:
    """Reads a stream on a thread, so the test can see how far it got."""

    def __init__(self, events: Iterator[TokenEvent]) -> None:
        self.events: list[TokenEvent] = []
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._thread.start()

    def _read(self, events: Iterator[TokenEvent]) -> None:
        for event in events:
            self.events.append(event)
        self.ended.set()

    @property
    def finish(self) -> FinishReason | None:
        return self.events[-1].finish_reason if self.ended.is_set() else None


def test_queued_requests_leave_at_once_behind_a_full_batch(engine: Engine) -> None:
    ids = engine.tokenize("The queue behind a full batch")
    params = SamplingParams(max_new_tokens=LONG, ignore_eos=True)
    running = engine.submit(GenerationRequest("running", ids, params))
    running_events = iter(running)
    next(running_events)  # it holds the only row
    runner = Reader(running_events)

    short = SamplingParams(max_new_tokens=4)
    patient = engine.submit(GenerationRequest("patient", ids, short))  # first in line, waits
    patient_reader = Reader(iter(patient))
    expiring = engine.submit(
        GenerationRequest("expiring", ids, short, deadline=time.monotonic() + 0.3)
    )
    cancelled = engine.submit(GenerationRequest("cancelled", ids, short))
    expired_reader, cancelled_reader = Reader(iter(expiring)), Reader(iter(cancelled))
    cancelled.cancel()

    assert cancelled_reader.ended.wait(60) and expired_reader.ended.wait(60)
    assert cancelled_reader.finish is FinishReason.CANCELLED
    assert expired_reader.finish is FinishReason.DEADLINE
    assert not runner.ended.is_set(), "they waited for the running request to finish"
    assert not patient_reader.ended.is_set() and engine.stats().queued == 1
    running.cancel()
    assert runner.ended.wait(60) and runner.finish is FinishReason.CANCELLED
    assert patient_reader.ended.wait(60) and patient_reader.finish is FinishReason.LENGTH
