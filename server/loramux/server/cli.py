"""`loramux serve`: run the gRPC server."""

from __future__ import annotations

import argparse

from loramux.core.config import DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT, add_settings_arguments


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = sub.add_parser(
        "serve",
        help="run the inference server",
        description=(
            "Load the base model once (4-bit NF4 by default) and serve generation requests for "
            f"many LoRA adapters over gRPC (default port {DEFAULT_GRPC_PORT}), with Prometheus "
            f"metrics over HTTP (default port {DEFAULT_METRICS_PORT}), on 127.0.0.1 unless "
            "--host / --metrics-host say otherwise. It needs an admin API key "
            "(--admin-keys-file, LORAMUX_ADMIN_KEYS) and refuses to start without one, unless "
            "--dev asks for a keyless development server. --tls-cert/--tls-key serve over TLS. "
            "SIGTERM drains in-flight requests, then exits 0."
        ),
    )
    add_settings_arguments(serve, ["model", "server", "engine"])
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from loramux.core.config import load_settings
    from loramux.server.triton_runtime import configure_process

    settings = load_settings(args)
    # Before the server's imports: they import triton (through torch._dynamo).
    configure_process(settings.lora_kernel, settings.attention_kernel, settings.device)
    from loramux.server.app import run_server

    return run_server(settings)
