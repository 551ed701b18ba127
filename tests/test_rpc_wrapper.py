"""The one RPC wrapper (issue 11, point 7): the same status mapping for unary and streaming.

A probe service, written exactly like LoRAMux's servicers (`@rpc` on a method taking the
caller's principal), runs on a real gRPC server on 127.0.0.1 with a real registry and
authenticator. Its handlers raise a non-LoRAMux exception on purpose: while the client is
still there that is a bug (INTERNAL, logged); once the client has cancelled it is not
(CANCELLED, not logged). The streaming copy of the wrapper used to lack the second branch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import grpc
import pytest
from api_helpers import eventually

from loramux.core.config import Settings
from loramux.core.errors import InvalidArgument
from loramux.server.app import GrpcServer
from loramux.server.metrics import Metrics
from loramux.server.registry import Quota, Registry
from loramux.server.rpc.wrapper import FIELD_METADATA, Servicer, admin_rpc, rpc
from loramux.server.state import ServerState
from loramux.server.tenants import Authenticator, ConcurrencyGate, Principal

ADMIN_KEY = "probe-admin-key"
SERVICE = "probe.Probe"


class Probe(Servicer):
    """Handlers that misbehave on request: `b"boom"` raises, `b"bad"` is a LoRAMux error."""

    def __init__(self, state: ServerState, executor: Executor) -> None:
        super().__init__(state, executor)
        self.waiting = threading.Event()
        self.ended = threading.Event()

    def _raise_after_cancel(self, context: grpc.aio.ServicerContext) -> None:
        context.add_done_callback(lambda _: self.ended.set())
        self.waiting.set()
        assert self.ended.wait(30), "the client never cancelled"
        raise RuntimeError("fails after the client went away")

    @rpc
    def Unary(
        self, request: bytes, context: grpc.aio.ServicerContext, principal: Principal
    ) -> bytes:
        if request == b"boom":
            raise RuntimeError("a bug")
        if request == b"bad":
            raise InvalidArgument("probe.field", "is bad")
        if request == b"cancel":
            self._raise_after_cancel(context)
        return principal.tenant.encode()

    @rpc
    def Stream(
        self, request: bytes, context: grpc.aio.ServicerContext, principal: Principal
    ) -> Iterator[bytes]:
        yield principal.tenant.encode()
        if request == b"boom":
            raise RuntimeError("a bug")
        if request == b"bad":
            raise InvalidArgument("probe.field", "is bad")
        if request == b"cancel":
            self._raise_after_cancel(context)
        yield b"done"

    @admin_rpc
    def Admin(
        self, request: bytes, context: grpc.aio.ServicerContext, principal: Principal
    ) -> bytes:
        return b"admin"


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[tuple[Probe, grpc.Channel]]:
    settings = Settings(home=tmp_path, admin_keys=[ADMIN_KEY])
    registry = Registry(tmp_path, Quota(4, 4, 4, 1 << 20))
    state = ServerState(
        settings=settings,
        engine=None,  # type: ignore[arg-type]  # the probe never generates
        registry=registry,
        auth=Authenticator(registry, [ADMIN_KEY]),
        gate=ConcurrencyGate(),
        metrics=Metrics(),
    )
    server = GrpcServer(4)
    servicer = Probe(state, server.pool)
    same = lambda b: b  # noqa: E731  # bytes on the wire, no protobuf needed
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.Unary, same, same),
        "Stream": grpc.unary_stream_rpc_method_handler(servicer.Stream, same, same),
        "Admin": grpc.unary_unary_rpc_method_handler(servicer.Admin, same, same),
    }
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    server.call(lambda: server.server.add_generic_rpc_handlers((generic,)))
    port = server.call(lambda: server.server.add_insecure_port("127.0.0.1:0"))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, channel
    finally:
        channel.close()
        server.close()
        registry.close()


def _method(channel: grpc.Channel, name: str, streaming: bool = False) -> Any:
    factory = channel.unary_stream if streaming else channel.unary_unary
    return factory(f"/{SERVICE}/{name}")


def _key(key: str = ADMIN_KEY) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _unexpected_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_cancelled_call_that_then_fails_is_not_a_bug(
    probe: tuple[Probe, grpc.Channel], caplog: pytest.LogCaptureFixture, streaming: bool
) -> None:
    servicer, channel = probe
    caplog.set_level(logging.INFO)
    method = _method(channel, "Stream" if streaming else "Unary", streaming)
    if streaming:
        call = method(b"cancel", metadata=_key(), timeout=30)
        assert next(call) == b"admin"
    else:
        call = method.future(b"cancel", metadata=_key(), timeout=30)
    assert servicer.waiting.wait(30)  # the handler runs, inside the wrapper
    assert servicer.state.inflight == 1
    call.cancel()
    assert eventually(lambda: servicer.state.inflight == 0)
    assert servicer.ended.is_set()
    assert _unexpected_errors(caplog) == []


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_statuses_are_mapped_alike(
    probe: tuple[Probe, grpc.Channel], caplog: pytest.LogCaptureFixture, streaming: bool
) -> None:
    servicer, channel = probe
    method = _method(channel, "Stream" if streaming else "Unary", streaming)

    def run(request: bytes, metadata: Any) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as raised:
            answer = method(request, metadata=metadata, timeout=30)
            if streaming:
                list(answer)
        return raised.value  # type: ignore[return-value]

    bad = run(b"bad", _key())
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(bad.trailing_metadata())[FIELD_METADATA] == "probe.field"
    assert run(b"ok", _key("wrong")).code() == grpc.StatusCode.UNAUTHENTICATED
    assert run(b"ok", ()).code() == grpc.StatusCode.UNAUTHENTICATED
    assert _unexpected_errors(caplog) == []
    boom = run(b"boom", _key())
    assert boom.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError" in (boom.details() or "")
    assert len(_unexpected_errors(caplog)) == 1  # a bug is logged, with its traceback
    servicer.state.start_draining()
    assert run(b"ok", _key()).code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.state.inflight == 0


def test_admin_methods_refuse_tenants(probe: tuple[Probe, grpc.Channel]) -> None:
    servicer, channel = probe
    registry = servicer.state.registry
    registry.create_tenant("alice", admin=False, quota=registry.default_quota)
    _, alice_key = registry.create_key("alice")
    assert _method(channel, "Admin")(b"", metadata=_key(), timeout=30) == b"admin"
    assert _method(channel, "Unary")(b"ok", metadata=_key(alice_key), timeout=30) == b"alice"
    with pytest.raises(grpc.RpcError) as refused:
        _method(channel, "Admin")(b"", metadata=_key(alice_key), timeout=30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
