"""What the HTTP front costs over gRPC: the same requests through both, in one run.

    python -m bench.transports            # 40 requests per transport, 16 tokens each
    python -m bench.transports --quick    # 10 requests per transport

One `loramux serve`-equivalent server in this process (the default SmolLM2, NF4, CPU)
with both fronts on 127.0.0.1. Requests alternate gRPC (`GenerateStream`, the sync client)
and HTTP (`/v1/completions` streamed as server-sent events, read with httpx), one at a
time, the same prompt, greedy with ignore_eos, so both make exactly the same tokens and
drift of the machine hits both alike. Reported per transport: time to the first token and
to the last, p50 and p90, and the HTTP/gRPC ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    PASSAGE,
    format_table,
    machine_info,
    percentile,
    print_machine,
    write_json,
)
from loramux.client import LoramuxClient
from loramux.core.config import Settings
from loramux.server.app import start_server

TOKENS = 16


def grpc_request(client: LoramuxClient, prompt: str) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    for chunk in client.generate_stream(prompt, max_new_tokens=TOKENS, ignore_eos=True):
        if chunk.token_ids and not first:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started


def http_request(http: httpx.Client, url: str, model: str, prompt: str) -> tuple[float, float]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.perf_counter()
    first = 0.0
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            started_text = line.startswith("data: {") and not first
            if started_text and json.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    firsts = [s[0] for s in samples]
    totals = [s[1] for s in samples]
    return {
        "ttft_p50_ms": 1000 * percentile(firsts, 50),
        "ttft_p90_ms": 1000 * percentile(firsts, 90),
        "total_p50_ms": 1000 * percentile(totals, 50),
        "total_p90_ms": 1000 * percentile(totals, 90),
    }


def run(requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "models").symlink_to(Settings().models_dir, target_is_directory=True)
        settings = Settings(home=home, port=0, metrics_port=0, http_port=_free_port(), dev=True)
        running = start_server(settings)
        try:
            assert running.http is not None
            url = f"http://127.0.0.1:{running.http.port}"
            model = running.state.engine.info.base_model
            prompt = PASSAGE[:400]
            samples: dict[str, list[tuple[float, float]]] = {"grpc": [], "http": []}
            with (
                LoramuxClient(f"127.0.0.1:{running.port}") as client,
                httpx.Client(timeout=120) as http,
            ):
                grpc_request(client, prompt)  # warm both paths once
                http_request(http, url, model, prompt)
                for _ in range(requests):
                    samples["grpc"].append(grpc_request(client, prompt))
                    samples["http"].append(http_request(http, url, model, prompt))
        finally:
            running.close()
    result = {name: summary(values) for name, values in samples.items()}
    result["ratio_http_over_grpc"] = {
        key: result["http"][key] / result["grpc"][key] for key in ("ttft_p50_ms", "total_p50_ms")
    }
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per transport")
    parser.add_argument("--quick", action="store_true", help="10 requests per transport")
    args = parser.parse_args(argv)
    info = machine_info()
    print_machine(info)
    result = run(10 if args.quick else args.requests)
    rows = [[name, *(f"{result[name][k]:.1f}" for k in result[name])] for name in ("grpc", "http")]
    print(format_table(["transport", "TTFT p50 ms", "p90", "total p50 ms", "p90"], rows))
    ratios = result["ratio_http_over_grpc"]
    print(
        f"HTTP/gRPC: TTFT p50 {ratios['ttft_p50_ms']:.2f}x, total p50 {ratios['total_p50_ms']:.2f}x"
    )
    write_json("transports", {"machine": info, "result": result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
