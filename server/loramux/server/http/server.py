"""uvicorn serving the HTTP front on a thread of the gRPC server's process.

The listening socket is bound first (`bind`), so a taken port is reported before the
model loads, as for gRPC; `HttpServer.start` then runs uvicorn's own event loop on a
thread. uvicorn installs no signal handlers off the main thread: SIGTERM stays with
`run_server`, which drains both transports.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn

from loramux.core.config import Settings
from loramux.core.errors import FailedPrecondition
from loramux.server.http.api import create_app
from loramux.server.http.body_limit import BodyLimit
from loramux.server.state import ServerState

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    try:
        return socket.create_server((host, port), backlog=1024)
    except OSError as exc:
        raise FailedPrecondition(
            "http_port", f"cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from exc


def tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS options from --tls-cert/--tls-key/--tls-client-ca: the HTTP front is
    served over TLS (mutual with a client CA) whenever gRPC is. Read once at start."""
    if settings.tls_cert is None or settings.tls_key is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(settings.tls_cert),
        "ssl_keyfile": str(settings.tls_key),
    }
    if settings.tls_client_ca is not None:
        options |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


class HttpServer:
    """The OpenAI-compatible API on `sock`, served by uvicorn on its own thread."""

    def __init__(self, state: ServerState, sock: socket.socket) -> None:
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        # A generation's admission work (adapter lookup, tokenising, grammar compile) runs
        # here; its slot wait, tokens and slow reader are awaited on the loop (aio.py).
        self.executor = ThreadPoolExecutor(
            max_workers=state.settings.http_workers, thread_name_prefix="http-gen"
        )
        app = BodyLimit(create_app(state, self.executor))
        config = uvicorn.Config(
            app,
            log_config=None,  # keep the process's logging set-up
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            **tls_options(state.settings),
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException:
            log.exception("the HTTP server stopped with an error")

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting and join the thread; open responses get `grace` s (0: cut at once).

        uvicorn closes the listening socket itself when it shuts down; it is closed here only
        once the thread has ended (closing it under a running loop makes uvicorn's shutdown
        fail on the dead file descriptor).
        """
        self.server.config.timeout_graceful_shutdown = math.ceil(max(grace, 0.0))
        self.server.force_exit = grace <= 0
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(grace + 5.0)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            self.sock.close()
