"""Per-tenant limits that hold across transports, and health beside them (issue 29).

A tenant's calls are one count whether they arrive over gRPC or the OpenAI-compatible HTTP
front: a tenant holding its `--tenant-max-calls` of slow-reading HTTP streams is refused
the next call on either transport while another tenant is served. And while tenants hold
every thread they may, the gRPC health service and HTTP `/health`, `/ready` still answer
at once.

A slow reader here is a socket with a small receive buffer that reads the status line and
then nothing: its server-sent events fill the buffers between them, and the stream stays
open (and counted) until the test closes it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from api_helpers import eventually, free_port, health_status
from grpc_health.v1 import health_pb2
from hardening_helpers import (
    ADMIN_KEY,
    call,
    create_tenants,
    generate_request,
    stubs,
    tiny_server,
    upload_requests,
)
from http_helpers import request_head

from loramux.core.config import Settings
from loramux.core.errors import RateLimited, retry_seconds
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer
from loramux.server.rates import RateLimiter
from loramux.server.registry import Quota
from loramux.server.tenants import Principal
from loramux.v1 import loramux_pb2 as pb

CAP = 2  # --tenant-max-calls
WORKERS = 4  # --grpc-workers and --http-workers


@pytest.fixture
def server(home: Path, tiny_llama: ResolvedModel) -> Iterator[RunningServer]:
    running = tiny_server(
        home,
        tiny_llama,
        http_port=free_port(),
        grpc_workers=WORKERS,
        http_workers=WORKERS,
        tenant_max_calls=CAP,
        max_new_tokens_limit=480,
    )
    yield running
    running.close()


def slow_stream(port: int, key: str, model: str, tokens: int = 480) -> socket.socket:
    """A streaming completion whose reader takes the status line and then nothing more."""
    body = json.dumps(
        {
            "model": model,
            "prompt": "a slow reader",
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
            "n": 4,
            "logprobs": 5,
        }
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    head = request_head(
        "/v1/completions",
        {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
        },
    )
    sock.sendall(head + body)
    answer = b""
    while b"\r\n" not in answer:
        piece = sock.recv(1)
        assert piece, "the server closed the stream before its status line"
        answer += piece
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return sock


def _model(server: RunningServer) -> str:
    return server.state.settings.served_model_name or server.state.engine.info.base_model


def _complete(url: str, key: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": "a calm question", "max_tokens": 4},
        timeout=60,
    )


def test_a_tenants_http_streams_count_against_its_grpc_calls_too(server: RunningServer) -> None:
    assert server.http is not None
    url = f"http://127.0.0.1:{server.http.port}"
    channel, inference, _, admin = stubs(f"127.0.0.1:{server.port}")
    keys = create_tenants(admin, ["slow", "calm"])
    model = _model(server)
    gate = server.state.gate
    assert server.http is not None
    streams: list[socket.socket] = []
    try:
        streams = [slow_stream(server.http.port, keys["slow"], model) for _ in range(CAP)]
        assert gate.calls().get("slow") == CAP

        refused = _complete(url, keys["slow"], model)
        assert refused.status_code == 429, refused.text
        assert "--tenant-max-calls" in refused.json()["error"]["message"]
        over_grpc = call(inference.Generate, generate_request("over the cap"), keys["slow"])
        assert over_grpc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, over_grpc
        assert "--tenant-max-calls" in over_grpc.details

        served = _complete(url, keys["calm"], model)
        assert served.status_code == 200, served.text
        assert call(inference.Generate, generate_request("calm"), keys["calm"]).code == (
            grpc.StatusCode.OK
        )
        assert gate.calls().get("slow") == CAP, "the slow streams were open all along"
    finally:
        for sock in streams:
            sock.close()
        channel.close()
    assert eventually(lambda: "slow" not in gate.calls())


def test_health_answers_while_tenants_hold_every_worker(server: RunningServer) -> None:
    """Tenants hold open HTTP streams and more stalled gRPC uploads than gRPC has threads
    (none holds one while it waits: the event loop, rpc/wrapper.py); another tenant's call
    is served, and health answers in 1 s. With the thread-per-call gRPC server before, the
    uploads held every thread tenants may take and the fifth tenant was refused."""
    assert server.http is not None
    url = f"http://127.0.0.1:{server.http.port}"
    address = f"127.0.0.1:{server.port}"
    channel, _, adapters, admin = stubs(address)
    keys = create_tenants(admin, ["a", "b", "c", "d", "e"])
    gate, model = server.state.gate, _model(server)
    release = threading.Event()
    streams: list[socket.socket] = []
    uploads: list[grpc.Future] = []
    try:
        # HTTP: CAP slow streams each for a and b.
        streams = [slow_stream(server.http.port, keys[t], model) for t in "ab" for _ in range(CAP)]
        # gRPC: uploads that send nothing until released, c and d CAP each: as many as
        # --grpc-workers, a thread each on a thread-per-call server.
        stalled = 2 * CAP
        assert stalled >= WORKERS
        for tenant in "cd":
            for _ in range(CAP):
                uploads.append(
                    adapters.UploadAdapter.future(
                        _unfinished_upload(release), metadata=_bearer(keys[tenant]), timeout=120
                    )
                )
        assert eventually(lambda: sum(gate.calls().get(t, 0) for t in "cd") == stalled)
        served = call(
            adapters.UploadAdapter, iter(upload_requests("x", {"f": b"1"})), keys["e"], timeout=5
        )
        assert served.code == grpc.StatusCode.INVALID_ARGUMENT, served  # read and answered
        assert served.field == "files[0].path"

        started = time.monotonic()
        assert health_status(address, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
        grpc_seconds = time.monotonic() - started
        started = time.monotonic()
        for path in ("/health", "/ready"):
            assert httpx.get(url + path, timeout=1.0).status_code == 200
        http_seconds = time.monotonic() - started
        print(
            f"health with every worker held: gRPC {grpc_seconds:.3f} s, HTTP {http_seconds:.3f} s"
        )
        assert grpc_seconds < 1.0 and http_seconds < 1.0
        held = gate.calls()
        assert held.get("a") == held.get("b") == CAP, "the slow streams were open all along"
        assert held.get("c", 0) + held.get("d", 0) == stalled
    finally:
        release.set()
        for sock in streams:
            sock.close()
        for future in uploads:
            future.cancel()
        channel.close()
    assert eventually(lambda: not gate.calls())


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _unfinished_upload(release: threading.Event) -> Iterator[pb.UploadAdapterRequest]:
    """An upload that sends nothing until `release`, then ends without its header: its
    handler waits for the first message meanwhile (a thread per call before grpc.aio)."""
    release.wait(120)
    yield from ()


# ---- rates per tenant ----

WINDOW = 4.0  # --tenant-rate-window-seconds: short, so the window turns within the test


@pytest.fixture
def rated(home: Path, tiny_llama: ResolvedModel) -> Iterator[RunningServer]:
    running = tiny_server(
        home, tiny_llama, http_port=free_port(), tenant_rate_window_seconds=WINDOW
    )
    yield running
    running.close()


def _create(admin: Any, name: str, quota: pb.TenantQuota) -> str:
    created = call(admin.CreateTenant, pb.CreateTenantRequest(name=name, quota=quota), ADMIN_KEY)
    assert created.code == grpc.StatusCode.OK, created
    answer = call(admin.CreateKey, pb.CreateKeyRequest(tenant=name), ADMIN_KEY)
    return str(answer.response.key)


def test_a_tenant_over_its_request_rate_is_told_when_to_retry(rated: RunningServer) -> None:
    assert rated.http is not None
    url = f"http://127.0.0.1:{rated.http.port}"
    channel, inference, _, admin = stubs(f"127.0.0.1:{rated.port}")
    model = _model(rated)
    try:
        limited = _create(admin, "limited", pb.TenantQuota(requests_per_minute=2))
        thrifty = _create(admin, "thrifty", pb.TenantQuota(tokens_per_minute=4))
        other = create_tenants(admin, ["other"])["other"]
        listed = call(admin.ListTenants, pb.ListTenantsRequest(), ADMIN_KEY).response
        quotas = {t.name: t.quota for t in listed.tenants}
        assert quotas["limited"].requests_per_minute == 2
        assert quotas["thrifty"].tokens_per_minute == 4

        assert _complete(url, limited, model).status_code == 200
        assert call(inference.Generate, generate_request("one"), limited).code == grpc.StatusCode.OK
        refused = _complete(url, limited, model)
        assert refused.status_code == 429, refused.text
        assert "--tenant-requests-per-minute" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= WINDOW
        over_grpc = _grpc_refusal(inference, limited)
        assert over_grpc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = dict(over_grpc.trailing_metadata() or ())["retry-after"]
        assert 1 <= int(retry) <= WINDOW

        for _ in range(3):  # another tenant, with the server's defaults: no limit
            assert _complete(url, other, model).status_code == 200
            assert call(inference.Generate, generate_request("x"), other).code == (
                grpc.StatusCode.OK
            )

        # Tokens: the first request's 4 tokens spend the budget, the next waits.
        assert _complete(url, thrifty, model).status_code == 200
        spent = _complete(url, thrifty, model)
        assert spent.status_code == 429 and "Retry-After" in spent.headers
        assert "--tenant-tokens-per-minute" in spent.json()["error"]["message"]

        # Once the window has turned, the limited tenant is served again.
        assert eventually(
            lambda: _complete(url, limited, model).status_code == 200, timeout=3 * WINDOW
        )
    finally:
        channel.close()


def _grpc_refusal(inference: Any, key: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        inference.Generate(generate_request("over"), metadata=_bearer(key), timeout=30)
    return refused.value


def test_rate_windows_turn_and_count_tokens_after_the_fact() -> None:
    now = [100.0]
    limiter = RateLimiter(requests=2, tokens=0, window=10.0, clock=lambda: now[0])
    tenant = Principal("t", admin=False, quota=Quota(1, 1, 1, 1))
    own = Principal("own", admin=False, quota=Quota(1, 1, 1, 1, requests_per_minute=1))
    limiter.admit(tenant)
    limiter.admit(tenant)
    now[0] = 103.5
    with pytest.raises(RateLimited) as refused:
        limiter.admit(tenant)
    assert refused.value.retry_after == pytest.approx(6.5)
    assert retry_seconds(refused.value) == 7
    limiter.admit(own)  # its own budget (1) comes before the server's (2)
    with pytest.raises(RateLimited):
        limiter.admit(own)
    now[0] = 110.0
    limiter.admit(tenant)  # a new window

    tokens = RateLimiter(tokens=5, window=10.0, clock=lambda: now[0])
    tokens.admit(tenant)
    tokens.spend("t", 8)  # one request may go over; the next waits
    with pytest.raises(RateLimited):
        tokens.admit(tenant)
    assert RateLimiter().admit(tenant) is None  # no budgets: nothing counted


def test_limit_settings_are_checked_naming_the_flag() -> None:
    # Calls hold no thread while they wait: only gRPC's pool (blocking work) bounds the cap.
    assert Settings(grpc_workers=8, http_port=8000, http_workers=4).calls_per_tenant == 4
    Settings(grpc_workers=8, http_port=8000, http_workers=4, tenant_max_calls=7).validate()
    with pytest.raises(ValueError, match="--grpc-workers"):
        Settings(grpc_workers=8, http_port=8000, http_workers=4, tenant_max_calls=8).validate()
    with pytest.raises(ValueError, match="--tenant-rate-window-seconds"):
        Settings(tenant_rate_window_seconds=0).validate()
    with pytest.raises(ValueError, match="--tenant-tokens-per-minute"):
        Settings(tenant_tokens_per_minute=-1).validate()
