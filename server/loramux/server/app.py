"""The server process: engine + registry + gRPC services + health + metrics + draining."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loramux.core.config import Settings
from loramux.core.errors import FailedPrecondition
from loramux.server.changes import RegistryWatcher, forget_removed_adapters
from loramux.server.engine import Engine
from loramux.server.http.server import HttpServer, bind
from loramux.server.metrics import METRICS_SALT, Metrics
from loramux.server.rates import RateLimiter
from loramux.server.registry import Quota, Registry
from loramux.server.rpc import AdapterServicer, AdminServicer, InferenceServicer
from loramux.server.state import ServerState, register_record
from loramux.server.tenants import (
    Authenticator,
    ConcurrencyGate,
    bootstrap_admin_keys,
)
from loramux.server.tls import TlsFiles
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("InferenceService", "AdapterService", "AdminService")
)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
T = TypeVar("T")


class GrpcServer:
    """grpcio's asyncio server (`grpc.aio`) on an event loop of its own thread.

    Every call is a task on this loop: one that waits (a tenant slot, tokens, a slow
    reader) holds no thread, and the health service answers from the loop itself, which no
    tenant's call can occupy (nothing blocking runs on it). Blocking work runs on `pool`,
    `--grpc-workers` threads (rpc/wrapper.py). The rest of the process is thread-based, so
    this object offers it plain blocking methods.
    """

    def __init__(self, workers: int) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc")
        self.health = self.call(health.aio.HealthServicer)
        self.server: grpc.aio.Server = self.run(self._create())
        self._stopped = False

    async def _create(self) -> grpc.aio.Server:
        return grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    def call(self, work: Callable[[], T]) -> T:
        """Run a plain function on the loop (the server's methods want its thread)."""

        async def on_loop() -> T:
            return work()

        return self.run(on_loop())

    def start(self) -> None:
        self.run(self.server.start())

    def set_health(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> None:
        self.run(self.health.set(service, status))

    def enter_graceful_shutdown(self) -> None:
        self.run(self.health.enter_graceful_shutdown())

    def stop(self, grace: float) -> futures.Future[None]:
        """Stop accepting; calls still running get `grace` s, then are cancelled. The
        future is done when the server has stopped."""
        return asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)

    def close(self) -> None:
        """Stop at once, then end the loop and its thread (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self.loop.is_running():
            try:
                self.stop(0).result(30)
            except Exception:  # already stopped, or never started
                log.debug("gRPC server stop", exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class RunningServer:
    state: ServerState
    server: GrpcServer
    port: int
    metrics_port: int
    metrics_http: object | None
    watcher: RegistryWatcher
    http: HttpServer | None = None
    drain_started: threading.Event = field(default_factory=threading.Event)
    _closed: bool = False

    def drain(self, grace: float) -> None:
        """Stop accepting, let in-flight calls finish within `grace` seconds, then stop.

        While draining, the server still answers health checks (NOT_SERVING, so load
        balancers move traffic away) and refuses new LoRAMux calls with UNAVAILABLE (which
        the client retries elsewhere or later); calls already running go on. Whatever still
        runs when `grace` is over is cancelled, which frees its engine row.
        """
        started = time.monotonic()
        log.info("draining: new calls refused, in-flight calls get %.0fs to finish", grace)
        self.state.start_draining()
        self.server.enter_graceful_shutdown()
        self.drain_started.set()
        if not self.state.wait_idle(grace):
            log.warning("drain: %d calls still running after %.0fs", self.state.inflight, grace)
        # Calls that just returned may still be sending their last message: a short grace.
        left = max(grace - (time.monotonic() - started), 0.0)
        stopped = self.server.stop(min(left, 5.0))
        if self.http is not None:
            self.http.stop(min(left, 5.0))
        stopped.result()
        self.close()

    def close(self) -> None:
        """Stop at once (idempotent): gRPC, then the engine, the registry, the metrics."""
        if self._closed:
            return
        self._closed = True
        self.server.close()
        self.watcher.stop()
        if self.http is not None:
            self.http.stop(0)
        self.state.engine.shutdown()
        self.state.registry.close()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()  # type: ignore[attr-defined]


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca: mutual TLS), or None.

    The files are read again when they change (checked at each new connection), so a
    rotated certificate (cert-manager, certbot) is served without a restart.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    files = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(),
        files.changed_configuration,
        require_client_authentication=settings.tls_client_ca is not None,
    )


def _bind(server: GrpcServer, settings: Settings) -> int:
    """Listen on host:port, alone (no SO_REUSEPORT sharing with a second server)."""
    address = f"{settings.host}:{settings.port}"
    credentials = _server_credentials(settings)
    try:
        if credentials is None:
            port = server.call(lambda: server.server.add_insecure_port(address))
        else:
            port = server.call(lambda: server.server.add_secure_port(address, credentials))
    except RuntimeError:
        port = 0
    if port == 0:
        raise FailedPrecondition(
            "port", f"cannot listen on {settings.host}:{settings.port} (in use, or not local)"
        )
    return port


def _serve_metrics(metrics: Metrics, settings: Settings) -> tuple[object, int]:
    host = settings.metrics_host
    try:
        http = metrics.serve(host, settings.metrics_port)
    except OSError as exc:
        raise FailedPrecondition(
            "metrics_port",
            f"cannot serve metrics on {host}:{settings.metrics_port} ({exc.strerror})",
        ) from exc
    return http, int(http.server_port)  # type: ignore[attr-defined]


def _open_registry(settings: Settings) -> tuple[Registry, Authenticator]:
    """The registry and who may call: refused here, before any port or model, without a key."""
    registry = Registry(
        settings.home,
        Quota(
            settings.tenant_max_concurrent,
            settings.tenant_max_queued,
            settings.tenant_max_adapters,
            settings.tenant_max_bytes,
        ),
        settings.registry,
        settings.adapter_dir,
    )
    log.info("registry: %s", registry.describe())
    try:
        auth = Authenticator(registry, bootstrap_admin_keys(settings), dev=settings.dev)
    except BaseException:
        registry.close()
        raise
    if auth.dev_mode:
        exposed = "" if is_loopback(settings.host) else f" ON {settings.host}, NOT LOOPBACK"
        log.warning(
            "--dev: DEVELOPMENT MODE%s, every caller is an admin (tenant 'default') without "
            "a key; never expose it",
            exposed,
        )
    return registry, auth


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def start_server(settings: Settings, engine: Engine | None = None) -> RunningServer:
    """Build everything and start serving; returns at once (port 0 picks a free port).

    Keys are checked first, then the ports are bound, so a missing admin key or a taken
    port is reported before the model loads.
    """
    registry, auth = _open_registry(settings)
    server = GrpcServer(settings.grpc_workers)
    metrics = Metrics(labels=settings.metrics_labels, salt_file=settings.home / METRICS_SALT)
    metrics_http, metrics_port = None, 0
    http_socket = http = None
    watcher: RegistryWatcher | None = None
    try:
        port = _bind(server, settings)
        if settings.http_port:
            http_socket = bind(settings.host, settings.http_port)
        if settings.metrics_port:
            metrics_http, metrics_port = _serve_metrics(metrics, settings)
        engine = engine or Engine.create(settings)
        metrics.attach(engine, settings.served_model_name)
        state = _build_services(server, settings, engine, metrics, registry, auth)
        watcher = RegistryWatcher(
            state.registry,
            lambda: forget_removed_adapters(state.registry, state.engine.adapters),
            settings.registry_poll_seconds,
        ).start()
        server.start()
        if http_socket is not None:
            http = HttpServer(state, http_socket)
            http.start()
    except BaseException:
        server.close()
        if watcher is not None:
            watcher.stop()
        registry.close()
        if metrics_http is not None:
            metrics_http.shutdown()  # type: ignore[attr-defined]
        if http is not None:
            http.stop(0)
        elif http_socket is not None:
            http_socket.close()
        raise
    for name in ("", *SERVICE_NAMES):
        server.set_health(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s on %s:%d (gRPC%s), metrics on http://%s:%d/metrics (labels %s)",
        engine.info.base_model,
        settings.host,
        port,
        " over TLS" if settings.tls_cert else ", plaintext",
        settings.metrics_host,
        metrics_port,
        settings.metrics_labels.value,
    )
    if http is not None:
        log.info("OpenAI-compatible API on http://%s:%d/v1", settings.host, http.port)
    return RunningServer(state, server, port, metrics_port, metrics_http, watcher, http)


def _build_services(
    server: GrpcServer,
    settings: Settings,
    engine: Engine,
    metrics: Metrics,
    registry: Registry,
    auth: Authenticator,
) -> ServerState:
    """Tenants and every servicer; stored adapters registered with the engine."""
    state = ServerState(
        settings=settings,
        engine=engine,
        registry=registry,
        auth=auth,
        gate=ConcurrencyGate(settings.calls_per_tenant),
        metrics=metrics,
        rates=RateLimiter(
            settings.tenant_requests_per_minute,
            settings.tenant_tokens_per_minute,
            settings.tenant_rate_window_seconds,
        ),
    )
    stored = registry.all_adapters()
    for record in stored:
        register_record(state, record)
    log.info("registry: %d stored adapters", len(stored))
    pool, aio = server.pool, server.server

    def add() -> None:  # on the loop, as grpc.aio wants
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(state, pool), aio)
        pb_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(state, pool), aio)
        pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(state, pool), aio)
        health_pb2_grpc.add_HealthServicer_to_server(server.health, aio)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), aio
        )

    server.call(add)
    return state


def run_server(settings: Settings) -> int:
    """`loramux serve`: run until SIGTERM/SIGINT, then drain and exit 0."""
    running = start_server(settings)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    running.drain(settings.drain_seconds)
    log.info("stopped")
    return 0
