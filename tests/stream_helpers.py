"""Slow readers on both transports, and the process figures the stream tests compare."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

from http_helpers import request_head


def open_unread_stream(port: int, key: str, model: str, n: int = 1) -> socket.socket:
    """A streaming completion whose client sends the request and then reads nothing: its
    events fill the socket buffers (4 KiB receive window), and it stays open until closed."""
    body = json.dumps(
        {
            "model": model,
            "prompt": "a reader that never reads",
            "max_tokens": 480,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 5,
            "n": n,
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
    return sock


def threads() -> int:
    """Threads of this process (the server runs in it; the tests' clients add none per call)."""
    return len(list(Path("/proc/self/task").iterdir()))


def rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1))
