"""The request body limit: 413 for bodies over the limit, before parsing, and delivered.

Refusing is easy; getting the refusal to the client is not. A server that answers while the
client is still sending and then closes a socket with unread data makes the kernel send a
TCP reset, and a client still writing its body (stdlib `urllib`, `requests`, httpx when the
reset wins the race) reports "connection reset" instead of the 413. uvicorn cannot linger
after a response (once the response is complete, `receive()` only says `http.disconnect`), so
`BodyLimit` drains before it answers: it reads the rest of the body and throws each piece
away, then sends the 413 and closes a socket with nothing unread (an orderly FIN). Nothing over
the limit is ever held: the app never sees more than `limit` bytes, and uvicorn hands the
drain at most its 64 KiB read buffer at a time.

The drain is bounded as nginx bounds its lingering close, so that a hostile client cannot hold
the server with it: at most `drain_bytes` of body in all (a client that declares more is
refused at once) and `drain_seconds` from the refusal on (a client that trickles or stalls is
cut off). Past either bound the 413 is sent and the socket closed as before; such a client
may then see a reset. A client that sent `Expect: 100-continue` has sent no body yet and is
refused at once, without a drain (curl does so for bodies over 1 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

MAX_BODY_BYTES = 16 * 1024 * 1024  # as gRPC's largest message
# 4x the limit: a 17 MiB body (the usual "slightly too big") is drained and gets its 413; at
# 100 Mbit/s 64 MiB takes ~5 s, the time bound. On 127.0.0.1 uvicorn drains ~1 GB/s.
DRAIN_BYTES = 4 * MAX_BODY_BYTES
DRAIN_SECONDS = 5.0  # nginx's lingering_timeout


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, before parsing.

    Checks the declared Content-Length first and counts the bytes as they arrive (chunked
    bodies declare none), so a hostile body never grows past the limit in memory; drains the
    rest of an over-limit body (at most `drain_bytes` in all, for at most `drain_seconds`)
    before answering, so that the client reads the 413 instead of a reset.
    """

    def __init__(
        self,
        app: Any,
        limit: int = MAX_BODY_BYTES,
        drain_bytes: int = DRAIN_BYTES,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self.app = app
        self.limit = limit
        self.drain_bytes = drain_bytes
        self.drain_seconds = drain_seconds

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= self.drain_bytes and not _expects_continue(headers):
                await self._drain(receive, 0)
            await self._refuse(send)
            return
        seen = 0
        over = False
        started = False

        async def limited_receive() -> Any:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Any) -> None:
            # Once over the limit, whatever the app answers (FastAPI turns the error raised
            # in receive into a 400 "error parsing the body", Starlette into a 500) is dropped:
            # the answer is the 413.
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if over and not started:
            await self._drain(receive, seen)
            await self._refuse(send)

    async def _drain(self, receive: Any, seen: int) -> None:
        """Read and discard the rest of the body: until its end, `drain_bytes` in all, or
        `drain_seconds`, whichever comes first."""
        try:
            async with asyncio.timeout(self.drain_seconds):
                while seen <= self.drain_bytes:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # http.disconnect: the client went away
                    seen += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            return

    async def _refuse(self, send: Any) -> None:
        body = (
            b'{"error":{"message":"the request body exceeds %d bytes","type":'
            b'"invalid_request_error","param":null,"code":"request_too_large"}}' % self.limit
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _expects_continue(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"expect", b"").lower() == b"100-continue"


class _TooLarge(Exception):
    pass
