"""GuideLLM (vLLM's load generator) against `loramux serve`, as a new user would run it.

    python -m bench.guidellm_run                        # 4 streams, 32 requests, 2 routes
    python -m bench.guidellm_run --streams 8 --requests 64

One `loramux serve` (dev mode, the built-in SmolLM2 in NF4, OpenAI-compatible HTTP on)
with one uploaded rank-16 all-linear adapter; `guidellm run` with a concurrent profile and
synthetic prompts against /v1/completions and then /v1/chat/completions, naming the
adapter as `model`. GuideLLM streams with vLLM's `stream_options.continuous_usage_stats`
and `ignore_eos`; before issue 25 the server refused all of its requests. Reported per
route: GuideLLM's request totals (the run is for errors: zero expected), and its median
time to first token, inter-token latency and output tokens per second, for scale only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, machine_info, print_machine, write_json
from bench.serve import free_port, start_loramux, upload_adapters

ROUTES = ("/v1/completions", "/v1/chat/completions")


def run_guidellm(
    http: str, route: str, tokenizer: Path, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    command = [
        str(Path(sys.executable).parent / "guidellm"),
        "run",
        "--backend",
        f"kind=openai_http,target={http},model=tuned,request_format={route}",
        "--profile",
        f"kind=concurrent,streams={args.streams}",
        "--constraint",
        f"kind=max_requests,count={args.requests}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
        f"output_tokens={args.output_tokens}",
        "--tokenizer",
        f"kind=huggingface_auto,model={tokenizer}",
        "--output",
        f"kind=json,path={out}",
        "--disable-console-interactive",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=3600)
    (benchmark,) = json.loads(out.read_text())["benchmarks"]
    metrics = benchmark["metrics"]

    def median(name: str) -> float:
        return float(metrics[name]["successful"]["median"])

    return {
        "route": route,
        "requests": metrics["request_totals"],
        "ttft_ms_median": median("time_to_first_token_ms"),
        "itl_ms_median": median("inter_token_latency_ms"),
        "output_tokens_per_second": float(
            metrics["output_tokens_per_second"]["successful"]["mean"]
        ),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=4, help="concurrent requests")
    parser.add_argument("--requests", type=int, default=32, help="requests per route")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--out", default="guidellm")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    from torch import device
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.common import write_adapters
    from loramux.core.config import Settings
    from loramux.core.models import resolve_base_model
    from loramux.server.lora import base_linear_shapes

    info = machine_info()
    print_machine(info)
    resolved = resolve_base_model("smollm2-135m-instruct", Settings().models_dir)
    with device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved.path))
    results = []
    with tempfile.TemporaryDirectory(prefix="loramux-bench-guidellm-") as tmp:
        root = Path(tmp)
        folders = write_adapters(root / "a", base_linear_shapes(skeleton), [16], "tuned-")
        folders = {"tuned": folders["tuned-0"]}
        port = free_port()
        server = start_loramux(root, 1, ["--http-port", str(port)])
        try:
            server.wait_ready(timeout=900)
            upload_adapters(server.address, folders)
            for route in ROUTES:
                out = root / f"{route.strip('/').replace('/', '-')}.json"
                result = run_guidellm(f"http://127.0.0.1:{port}", route, resolved.path, args, out)
                results.append(result)
                print(json.dumps(result))
        finally:
            server.stop()
    settings = {**vars(args), "results_dir": str(args.results_dir)}  # a copy: args stays
    payload = {"machine": info, "settings": settings, "results": results}
    print(f"# wrote {write_json(args.out, payload, args.results_dir)}")
    return payload


if __name__ == "__main__":
    main()
