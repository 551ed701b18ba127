"""The body limit's drain is bounded: a client past its bytes or its time is cut off.

`BodyLimit` reads an over-limit body away before it answers 413 (so that the client gets
the answer, `test_http_api.py::test_oversized_bodies_get_their_413_and_an_orderly_close`).
Here, on a real uvicorn on 127.0.0.1 with small bounds, a hostile client cannot use that
drain to hold the server: one that sends without end, or declares more than the drain reads,
or trickles, is cut off, the app behind never sees more than the limit, and other clients
are served meanwhile. Every socket call has a timeout: a server that kept draining fails
the test instead of hanging it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from api_helpers import eventually
from fastapi import FastAPI, Request
from http_helpers import Exchange, chunk, exchange, request_head

from loramux.server.http.body_limit import BodyLimit
from loramux.server.http.server import bind

LIMIT = 64 * 1024
PIECE = b"a" * (16 * 1024)


class App:
    """A FastAPI app behind `BodyLimit`, on uvicorn's own thread; records what it read."""

    def __init__(self, drain_bytes: int, drain_seconds: float) -> None:
        self.read: list[int] = []  # body bytes each POST /echo read
        api = FastAPI()

        @api.post("/echo")
        async def echo(request: Request) -> dict[str, int]:
            self.read.append(0)
            async for piece in request.stream():
                self.read[-1] += len(piece)
            return {"read": self.read[-1]}

        @api.get("/ok")
        async def ok() -> dict[str, str]:
            return {"status": "ok"}

        sock = bind("127.0.0.1", 0)
        self.port = int(sock.getsockname()[1])
        app = BodyLimit(api, LIMIT, drain_bytes=drain_bytes, drain_seconds=drain_seconds)
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()

    def serves(self) -> bool:
        """Another client is answered."""
        response = httpx.get(f"http://127.0.0.1:{self.port}/ok", timeout=20)
        return response.status_code == 200

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def app(request: pytest.FixtureRequest) -> Iterator[App]:
    drain_bytes, drain_seconds = request.param
    running = App(drain_bytes, drain_seconds)
    assert eventually(lambda: running.server.started)
    yield running
    running.stop()


def endless_chunks() -> Iterator[bytes]:
    while True:
        yield chunk(PIECE)


def chunked_head() -> bytes:
    return request_head("/echo", {"Transfer-Encoding": "chunked"})


# Only the byte bound can end these drains within the clients' 20 s timeouts.
@pytest.mark.parametrize("app", [(4 * LIMIT, 600.0)], indirect=True)
def test_a_body_past_the_drain_bytes_is_cut_off(app: App) -> None:
    # Within the bound: drained, answered, closed in order.
    within = exchange(
        app.port, chunked_head(), itertools.chain([chunk(PIECE)] * 12, [b"0\r\n\r\n"]), 20
    )
    assert (within.status, within.send_error, within.read_error) == (413, None, None)
    # Without end, chunked: the drain stops at its bound and the server closes.
    endless = exchange(app.port, chunked_head(), endless_chunks(), 20)
    assert endless.send_error is not None
    # Declared past the bound: refused at once, nothing drained.
    head = request_head("/echo", {"Content-Length": str(1 << 30)})
    declared = exchange(app.port, head, itertools.repeat(PIECE), 20)
    assert declared.send_error is not None
    # The app never saw more than the limit (the declared one: nothing at all).
    assert len(app.read) == 2
    assert max(app.read) <= LIMIT
    assert app.serves()


def stalled_body(sent: threading.Event, release: threading.Event, rest: bool) -> Iterator[bytes]:
    """80 KiB of a declared 256 KiB, then nothing until `release` (then the rest, or none)."""
    yield PIECE * 5
    sent.set()
    if release.wait(60) and rest:
        yield b"a" * (4 * LIMIT - 5 * len(PIECE))


@pytest.mark.parametrize("app", [(1 << 30, 1.0)], indirect=True)
def test_a_stalled_body_is_cut_off_after_the_drain_time(app: App) -> None:
    """After the drain time the client gets its 413, and nothing is left unread, so the
    close is in order. Without the time bound the drain would wait for the body forever."""
    sent, release = threading.Event(), threading.Event()
    head = request_head("/echo", {"Content-Length": str(4 * LIMIT)})
    try:  # the answer lets the writer end, without sending more
        result = exchange(
            app.port, head, stalled_body(sent, release, False), 20, lambda _: release.set()
        )
    finally:
        release.set()
    assert (result.status, result.read_error) == (413, None)
    assert result.json()["error"]["code"] == "request_too_large"
    assert app.read == []  # declared over the limit: the app was never called
    assert app.serves()


@pytest.mark.parametrize("app", [(1 << 30, 600.0)], indirect=True)
def test_others_are_served_while_a_body_is_drained(app: App) -> None:
    """A stalled client is held in the drain (no answer before its body ends or 600 s)
    while another client is answered; once its body ends it gets its 413 in order."""
    sent, release = threading.Event(), threading.Event()
    answered = threading.Event()
    head = request_head("/echo", {"Content-Length": str(4 * LIMIT)})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            exchange,
            app.port,
            head,
            stalled_body(sent, release, True),
            20,
            lambda _: answered.set(),
        )
        try:
            assert sent.wait(20)
            assert app.serves()
            assert not answered.is_set()
        finally:
            release.set()
        result: Exchange = future.result()
    assert (result.status, result.send_error, result.read_error) == (413, None, None)
    assert app.read == []
