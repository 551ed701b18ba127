"""Open streams against `loramux serve`: threads, memory, another tenant's latency (issue 29).

    python -m bench.streams                               # 500 gRPC + 500 SSE unread streams
    python -m bench.streams --grpc 1000 --sse 1000 --tenants 20     # 2,000 across 20 tenants
    python -m bench.streams --baseline-python OTHER/.venv/bin/python   # that checkout too

One `loramux serve` process (admin keys, HTTP front on, the default NF4 base on the CPU)
per interpreter. Slow tenants (`--tenants`, half opening gRPC GenerateStream calls, half
streaming `/v1/completions`) each open their share of streams whose client never reads
(gRPC: a call never iterated, its messages fill HTTP/2's windows; SSE: a socket with a
4 KiB receive window that reads nothing). Each slow tenant has `--running` rows
generating (480 tokens, logprobs 5), the rest of its streams wait in its line. The server
process's threads (`/proc/PID/task`) and RSS are read with the first quarter of the streams
open and with all; a calm tenant's 8-token gRPC Generate and HTTP completion are timed
(best of 3) before any stream opens and with all open, then both health checks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, format_table, machine_info, print_machine, write_json
from bench.serve import ServerProcess, free_port

ADMIN_KEY = "bench-streams-admin-key"


def start_server(root: Path, python: str, grpc_streams: int) -> tuple[ServerProcess, int]:
    from loramux.core.config import Settings

    home = root / "home"
    home.mkdir()
    (home / "models").symlink_to(Settings().models_dir, target_is_directory=True)
    keys = root / "admin-keys"
    keys.write_text(ADMIN_KEY + "\n")
    keys.chmod(0o600)
    port, http_port = free_port(), free_port()
    workers = grpc_streams + 64  # the thread-per-call server needs a thread per open stream
    command = [
        python,
        "-m",
        "loramux.cli",
        "serve",
        "--home",
        str(home),
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        "0",
        "--device",
        "cpu",
        "--log-level",
        "WARNING",
        "--admin-keys-file",
        str(keys),
        "--grpc-workers",
        str(workers),
        "--tenant-max-calls",
        str(workers - 1),
        "--max-new-tokens-limit",
        "480",
        "--max-queued-requests",
        "8192",
    ]
    server = ServerProcess("loramux", command, port, root / "loramux.log")
    return server, http_port


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1))


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _unread_sse(port: int, key: str, model: str) -> socket.socket:
    body = json.dumps(
        {
            "model": model,
            "prompt": "a reader that never reads",
            "max_tokens": 480,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 5,
        }
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def measure(python: str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loramux.v1 import loramux_pb2 as pb
    from loramux.v1 import loramux_pb2_grpc as pb_grpc

    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        server, http_port = start_server(Path(tmp), python, args.grpc)
        try:
            pid = server.process.pid
            channel = grpc.insecure_channel(server.address)
            inference = pb_grpc.InferenceServiceStub(channel)
            admin = pb_grpc.AdminServiceStub(channel)
            deadline = time.monotonic() + 600
            while True:  # until the model is loaded and the port serves
                if server.process.poll() is not None:
                    raise RuntimeError(server.log.read_text()[-3000:])
                try:
                    model = inference.ModelInfo(
                        pb.ModelInfoRequest(), metadata=_bearer(ADMIN_KEY), timeout=5
                    )
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
            model_name = model.base_model

            def tenant(name: str, queued: int) -> str:
                quota = pb.TenantQuota(max_concurrent=args.running, max_queued=queued)
                admin.CreateTenant(
                    pb.CreateTenantRequest(name=name, quota=quota), metadata=_bearer(ADMIN_KEY)
                )
                made = admin.CreateKey(
                    pb.CreateKeyRequest(tenant=name), metadata=_bearer(ADMIN_KEY)
                )
                return str(made.key)

            half = max(1, args.tenants // 2)
            grpc_keys = [tenant(f"g{i}", args.grpc) for i in range(half)]
            sse_keys = [tenant(f"h{i}", args.sse) for i in range(args.tenants - half)]
            calm = tenant("calm", 8)

            def generate() -> float:
                started = time.monotonic()
                request = pb.GenerateRequest(prompt="a calm question", max_new_tokens=8)
                inference.Generate(request, metadata=_bearer(calm), timeout=120)
                return time.monotonic() - started

            def complete() -> float:
                started = time.monotonic()
                answer = httpx.post(
                    f"http://127.0.0.1:{http_port}/v1/completions",
                    headers={"Authorization": f"Bearer {calm}"},
                    json={"model": model_name, "prompt": "a calm question", "max_tokens": 8},
                    timeout=120,
                )
                answer.raise_for_status()
                return time.monotonic() - started

            alone = (min(generate() for _ in range(3)), min(complete() for _ in range(3)))
            slow_channel = grpc.insecure_channel(
                server.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            slow = pb_grpc.InferenceServiceStub(slow_channel)
            request = pb.GenerateRequest(
                prompt="a reader that never reads",
                max_new_tokens=480,
                ignore_eos=True,
                sampling=pb.SamplingParameters(logprobs=5),
            )
            calls: list[Any] = []
            sockets: list[socket.socket] = []

            def open_streams(grpc_count: int, sse_count: int) -> None:
                for i in range(grpc_count):
                    key = grpc_keys[i % len(grpc_keys)]
                    calls.append(slow.GenerateStream(request, metadata=_bearer(key), timeout=3600))
                for i in range(sse_count):
                    sockets.append(_unread_sse(http_port, sse_keys[i % len(sse_keys)], model_name))

            def settle() -> None:  # admission done: the thread count stops moving
                previous, steady = -1, 0
                while steady < 5:
                    time.sleep(1.0)
                    now = _threads(pid)
                    steady = steady + 1 if now == previous else 0
                    previous = now

            try:
                first = (args.grpc // 4, args.sse // 4)
                open_streams(*first)
                settle()
                threads_first, rss_first = _threads(pid), _rss_kib(pid)
                open_streams(args.grpc - first[0], args.sse - first[1])
                settle()
                threads_all, rss_all = _threads(pid), _rss_kib(pid)
                loaded = (min(generate() for _ in range(3)), min(complete() for _ in range(3)))
                with grpc.insecure_channel(server.address) as fresh:
                    started = time.monotonic()
                    health_pb2_grpc.HealthStub(fresh).Check(
                        health_pb2.HealthCheckRequest(), timeout=30
                    )
                    grpc_health = time.monotonic() - started
                started = time.monotonic()
                httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=30).raise_for_status()
                http_health = time.monotonic() - started
                opened = len(calls) + len(sockets) - sum(first)
                return {
                    "server": label,
                    "streams": len(calls) + len(sockets),
                    "threads_first": threads_first,
                    "threads_all": threads_all,
                    "rss_kib_per_stream": (rss_all - rss_first) / max(1, opened),
                    "generate_alone_s": alone[0],
                    "generate_loaded_s": loaded[0],
                    "completion_alone_s": alone[1],
                    "completion_loaded_s": loaded[1],
                    "grpc_health_s": grpc_health,
                    "http_health_s": http_health,
                }
            finally:
                for call in calls:
                    call.cancel()
                for sock in sockets:
                    sock.close()
                slow_channel.close()
                channel.close()
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", type=int, default=500, help="unread gRPC streams in all")
    parser.add_argument("--sse", type=int, default=500, help="unread SSE streams in all")
    parser.add_argument("--tenants", type=int, default=2, help="slow tenants (half gRPC)")
    parser.add_argument("--running", type=int, default=2, help="each slow tenant's rows")
    parser.add_argument("--baseline-python", type=Path, help="also this interpreter's server")
    parser.add_argument("--out", default="streams")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    info = machine_info()
    print_machine(info)
    servers = [(sys.executable, "branch")]
    if args.baseline_python is not None:
        servers.append((str(args.baseline_python), "baseline"))
    rows = [measure(python, label, args) for python, label in servers]
    print(
        format_table(
            [
                "server",
                "streams",
                "threads 1/4 -> all",
                "RSS/stream KiB",
                "Generate loaded (alone) s",
                "completion loaded (alone) s",
                "gRPC health s",
                "/health s",
            ],
            [
                [
                    r["server"],
                    r["streams"],
                    f"{r['threads_first']} -> {r['threads_all']}",
                    f"{r['rss_kib_per_stream']:.1f}",
                    f"{r['generate_loaded_s']:.3f} ({r['generate_alone_s']:.3f})",
                    f"{r['completion_loaded_s']:.3f} ({r['completion_alone_s']:.3f})",
                    f"{r['grpc_health_s']:.3f}",
                    f"{r['http_health_s']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    write_json(args.out, {"machine": info, "args": vars(args), "rows": rows}, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
