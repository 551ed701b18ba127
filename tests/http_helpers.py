"""A raw HTTP/1.1 client for the body-limit tests: it writes and reads at the same time.

Ordinary clients hide what the body limit tests need to see: whether the server read the
body the client wrote, and whether the connection ended in order (FIN) or with a reset.
`exchange` writes the request from a thread with `sendall` while the calling thread reads
the answer, and reports both sides' errors instead of raising them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass
class Exchange:
    answer: bytes  # everything read, up to EOF or the error
    read_error: OSError | None  # None: the answer ended with an orderly close (FIN)
    send_error: OSError | None  # None: the whole request was written

    @property
    def status(self) -> int:
        return int(self.answer.split(b" ", 2)[1]) if self.answer.startswith(b"HTTP/1.1") else 0

    def json(self) -> Any:
        return json.loads(self.answer.partition(b"\r\n\r\n")[2])


def request_head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    """One chunk of a `Transfer-Encoding: chunked` body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def exchange(
    port: int,
    head: bytes,
    body: Iterable[bytes],
    timeout: float = 60.0,
    on_answer: Callable[[bytes], None] | None = None,
) -> Exchange:
    """Send `head` and then each piece of `body` from a thread; read the answer meanwhile.

    `timeout` bounds every socket call: a server that neither answers nor closes fails the
    test with `TimeoutError` instead of hanging it. `on_answer` sees each piece read.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    send_errors: list[OSError] = []

    def write() -> None:
        try:
            sock.sendall(head)
            for piece in body:
                sock.sendall(piece)
        except OSError as error:
            send_errors.append(error)

    writer = threading.Thread(target=write, name="raw-http-writer", daemon=True)
    writer.start()
    answer = b""
    read_error: OSError | None = None
    try:
        while piece := sock.recv(65536):
            answer += piece
            if on_answer is not None:
                on_answer(piece)
    except TimeoutError:
        _release(sock, writer)
        raise
    except OSError as error:
        read_error = error
    writer.join(timeout)
    stuck = writer.is_alive()
    _release(sock, writer)
    assert not stuck, "the writer was still blocked long after the answer ended"
    return Exchange(answer, read_error, send_errors[0] if send_errors else None)


def _release(sock: socket.socket, writer: threading.Thread) -> None:
    """Close `sock`, first unblocking a writer still stuck in `sendall` (a writer stuck in
    its body iterator is left to it: a daemon thread)."""
    if writer.is_alive():
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        writer.join(5)
    sock.close()
