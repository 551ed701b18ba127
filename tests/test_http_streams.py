"""HTTP streams hold no thread while they wait for a slot, for tokens or for a slow reader
(issue 29, point 1).

One tenant opens STREAMS streaming completions on raw sockets that never read past what the
kernel takes in for them: a few generate (the tenant's `max_concurrent`) into a reader that
does not read, the rest wait in the tenant's line for a slot. Meanwhile the server's thread
count must not grow with the number of open streams, another tenant's plain request must
complete about as fast as alone, and `/health` and the gRPC health service must answer
within 1 s. The figures are printed (`pytest -s`) and kept in docs/performance.md.

On the code before this change each of these streams held a thread of `--http-workers` for
its whole life: with the settings below only 4 of the first 50 streams got past admission
(`loramux serve` refused them outright: --tenant-max-calls had to stay below
--http-workers), and with a pool of 256 the thread count grew by one per open stream
(74 -> 237 threads from 50 to 200 streams).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from api_helpers import eventually, free_port, health_status
from grpc_health.v1 import health_pb2
from hardening_helpers import ADMIN_KEY, call, create_tenants, stubs, tiny_server
from stream_helpers import open_unread_stream, rss_kib, threads

from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer
from loramux.v1 import loramux_pb2 as pb

STREAMS = 200  # the slow tenant's open streams
FIRST = 50  # opened first: the thread count with FIRST open is the baseline
RUNNING = 4  # the slow tenant's max_concurrent: rows generating for unread streams
HTTP_WORKERS = 4  # admission threads only; far fewer than the streams


@pytest.fixture
def server(home: Path, tiny_llama: ResolvedModel) -> Iterator[RunningServer]:
    running = tiny_server(
        home,
        tiny_llama,
        http_port=free_port(),
        grpc_workers=STREAMS + 56,
        http_workers=HTTP_WORKERS,
        tenant_max_calls=STREAMS + 10,
        max_new_tokens_limit=480,
        tenant_rate_window_seconds=3600,  # a budget spent in a test stays spent
    )
    yield running
    running.close()


def _model(server: RunningServer) -> str:
    return server.state.settings.served_model_name or server.state.engine.info.base_model


def _timed_completion(url: str, key: str, model: str) -> float:
    started = time.monotonic()
    answer = httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": "a calm question", "max_tokens": 8, "ignore_eos": True},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 8
    return time.monotonic() - started


def test_open_streams_hold_no_thread_and_leave_others_served(server: RunningServer) -> None:
    assert server.http is not None
    port = server.http.port
    url = f"http://127.0.0.1:{port}"
    address = f"127.0.0.1:{server.port}"
    channel, _, _, admin = stubs(address)
    quota = pb.TenantQuota(max_concurrent=RUNNING, max_queued=STREAMS)
    created = call(admin.CreateTenant, pb.CreateTenantRequest(name="slow", quota=quota), ADMIN_KEY)
    assert created.code == grpc.StatusCode.OK, created
    slow_key = call(admin.CreateKey, pb.CreateKeyRequest(tenant="slow"), ADMIN_KEY).response.key
    calm_key = create_tenants(admin, ["calm"])["calm"]
    gate, engine, model = server.state.gate, server.state.engine, _model(server)

    def admitted() -> int:
        """The slow tenant's streams past admission: generating, or in line for a slot."""
        return gate.in_flight().get("slow", 0) + gate.waiting().get("slow", 0)

    alone = min(_timed_completion(url, calm_key, model) for _ in range(3))
    streams: list[socket.socket] = []
    try:
        streams = [open_unread_stream(port, slow_key, model) for _ in range(FIRST)]
        assert eventually(lambda: admitted() == FIRST, timeout=60), (admitted(), gate.calls())
        threads_first, rss_first = threads(), rss_kib()
        streams += [open_unread_stream(port, slow_key, model) for _ in range(STREAMS - FIRST)]
        assert eventually(lambda: admitted() == STREAMS, timeout=120), (admitted(), gate.calls())
        assert gate.in_flight().get("slow") == RUNNING
        assert eventually(lambda: engine.stats().running == RUNNING)
        threads_all, rss_all = threads(), rss_kib()

        loaded = min(_timed_completion(url, calm_key, model) for _ in range(3))
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=1.0).status_code == 200
        http_health = time.monotonic() - started
        started = time.monotonic()
        assert health_status(address, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
        grpc_health = time.monotonic() - started
        assert admitted() == STREAMS, "the slow streams were open all along"

        per_stream = (rss_all - rss_first) / (STREAMS - FIRST)
        print(
            f"\n{STREAMS} open streams ({RUNNING} generating, the rest in line): threads "
            f"{threads_first} with {FIRST} open, {threads_all} with {STREAMS}; RSS "
            f"+{per_stream:.1f} KiB per stream; another tenant's completion {loaded:.3f} s "
            f"(alone {alone:.3f} s); /health {http_health:.3f} s, gRPC health {grpc_health:.3f} s"
        )
        assert threads_all <= threads_first + 4, "threads grew with the open streams"
        assert loaded <= 2 * alone + 0.5, (loaded, alone)
        assert http_health < 1.0 and grpc_health < 1.0
    finally:
        for sock in streams:
            sock.close()
        channel.close()
    assert eventually(lambda: "slow" not in gate.calls(), timeout=60), gate.calls()
    assert eventually(lambda: engine.stats().running == 0, timeout=60)
    assert admitted() == 0


def test_an_unread_stream_gives_its_slot_back_once_generated(server: RunningServer) -> None:
    """The engine does not wait for a reader: a stream whose client reads nothing is
    generated to its end and its tenant's slot goes back then, so the tenant's next request
    runs; when the client reads at last it gets every token of every choice, in few events
    (what piled up comes merged), then [DONE]."""
    assert server.http is not None
    port, url = server.http.port, f"http://127.0.0.1:{server.http.port}"
    channel, _, _, admin = stubs(f"127.0.0.1:{server.port}")
    quota = pb.TenantQuota(max_concurrent=1, max_queued=1)
    created = call(admin.CreateTenant, pb.CreateTenantRequest(name="one", quota=quota), ADMIN_KEY)
    assert created.code == grpc.StatusCode.OK, created
    key = call(admin.CreateKey, pb.CreateKeyRequest(tenant="one"), ADMIN_KEY).response.key
    channel.close()
    gate, engine, model = server.state.gate, server.state.engine, _model(server)
    sock = open_unread_stream(port, key, model, n=4)
    try:
        assert eventually(lambda: gate.in_flight().get("one") == 1)
        assert eventually(
            lambda: gate.in_flight().get("one") == 0 and engine.stats().running == 0, timeout=120
        ), "the engine waited for the reader"
        _timed_completion(url, key, model)  # the tenant's one slot is free
        answer = b""
        while b"data: [DONE]" not in answer:
            piece = sock.recv(65536)
            assert piece, "the server closed the stream before [DONE]"
            answer += piece
    finally:
        sock.close()
    events = _events(answer)
    assert _tokens(events, 4) == [480] * 4
    assert len(events) < 4 * 480 / 2, "what piled up came merged"
    assert eventually(lambda: "one" not in gate.calls())


def _events(answer: bytes) -> list[dict[str, Any]]:
    """The JSON events of a raw SSE answer (each event is one HTTP chunk: no line split)."""
    return [json.loads(line[6:]) for line in answer.split(b"\r\n") if line.startswith(b"data: {")]


def _tokens(events: list[dict[str, Any]], n: int) -> list[int]:
    """Tokens received per choice (each carries its logprobs)."""
    tokens = [0] * n
    for event in events:
        for choice in event["choices"]:
            tokens[choice["index"]] += len((choice.get("logprobs") or {}).get("tokens", []))
    return tokens


def test_tokens_of_a_stream_its_client_left_count_against_the_budget(
    server: RunningServer,
) -> None:
    """A client that reads part of a stream and goes away is billed for what was generated
    (the cancelled request's tokens count when the engine ends it, as over gRPC), so
    leaving early does not dodge --tenant-tokens-per-minute."""
    assert server.http is not None
    port, url = server.http.port, f"http://127.0.0.1:{server.http.port}"
    channel, _, _, admin = stubs(f"127.0.0.1:{server.port}")
    quota = pb.TenantQuota(tokens_per_minute=40)
    created = call(
        admin.CreateTenant, pb.CreateTenantRequest(name="leaver", quota=quota), ADMIN_KEY
    )
    assert created.code == grpc.StatusCode.OK, created
    key = call(admin.CreateKey, pb.CreateKeyRequest(tenant="leaver"), ADMIN_KEY).response.key
    channel.close()
    gate, engine, model = server.state.gate, server.state.engine, _model(server)
    sock = open_unread_stream(port, key, model)
    answer = b""
    try:
        while _tokens(_events(answer), 1)[0] < 50:
            piece = sock.recv(65536)
            assert piece, "the server closed the stream early"
            answer += piece
    finally:
        sock.close()
    assert eventually(lambda: "leaver" not in gate.calls() and engine.stats().running == 0)
    refused = httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": "again", "max_tokens": 4},
        timeout=60,
    )
    assert refused.status_code == 429, refused.text
    assert "--tenant-tokens-per-minute" in refused.json()["error"]["message"]
