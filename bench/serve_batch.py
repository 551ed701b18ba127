"""Closed-loop batches over gRPC: what a user sees when N requests each name an adapter.

    python -m bench.serve_batch                      # batch 32: base, 32 distinct, ranks
    python -m bench.serve_batch --batch 1 --configs base,one
    python -m bench.serve_batch --stream-intervals 1,8   # one server per interval

Issue 13 measures the LoRA compute end to end through the server, not only in the engine:
N concurrent GenerateStream calls, each naming its own rank-16 all-linear adapter (or none,
for the base model), greedy with ignore_eos so every call makes exactly `--new-tokens`
tokens. One `loramux serve` process serves every configuration (adapters uploaded and
loaded through the public API first), and the configurations' rounds alternate within each
repetition, so a drift of the machine's speed hits them alike. A round's throughput is
N x new tokens over the round's wall time (first call sent to last call done): prefill,
decode, streaming and gRPC included.

`--stream-intervals 1,8` starts one server per `--stream-interval` (tokens per streamed
message), and `--baseline-python main/.venv/bin/python` one more from another checkout's
virtualenv (its code, its defaults); the rounds alternate over servers as well as
configurations, so they are compared side by side; each server's ratios are against its
own base.

Configurations:

* base   no adapter on any call
* one    one adapter named by every call
* k32    call i names adapter i (rank 16); with --batch 32, 32 distinct adapters
* ranks  call i names a rank-(8, 16, 32, 64)[i % 4] adapter, all distinct
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    PASSAGE,
    RESULTS_DIR,
    format_table,
    machine_info,
    print_machine,
    write_json,
)
from bench.serve import start_loramux, upload_adapters

CONFIGS = ("base", "one", "k32", "ranks")
RANK_CYCLE = (8, 16, 32, 64)


def adapters_for(config: str, batch: int) -> list[str]:
    """The adapter each of the round's `batch` calls names ("" is the base model)."""
    if config == "base":
        return [""] * batch
    if config == "one":
        return ["r16-0"] * batch
    if config == "k32":
        return [f"r16-{i}" for i in range(batch)]
    if config == "ranks":
        return [f"mixed-{i}" for i in range(batch)]
    raise ValueError(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")


async def run_round(address: str, adapters: list[str], prompts: list[str], new: int) -> float:
    """Sends the calls together; returns the seconds until the last one finished."""
    import grpc

    from loramux.v1 import loramux_pb2 as pb
    from loramux.v1 import loramux_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def one(adapter: str, prompt: str) -> int:
            request = pb.GenerateRequest(
                adapter=adapter, prompt=prompt, max_new_tokens=new, ignore_eos=True
            )
            made = 0
            async for message in stub.GenerateStream(request, timeout=600):
                made += len(message.token_ids)
            return made

        started = time.perf_counter()
        made = await asyncio.gather(*(one(a, p) for a, p in zip(adapters, prompts, strict=True)))
        seconds = time.perf_counter() - started
    if any(m != new for m in made):
        raise RuntimeError(f"calls made {made} tokens, expected {new} each")
    return seconds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="concurrent calls per round")
    parser.add_argument("--configs", default="base,k32,ranks", help=f"from {','.join(CONFIGS)}")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--stream-intervals",
        default="1",
        help="server --stream-interval values, one server each, e.g. 1,8 (default 1)",
    )
    parser.add_argument(
        "--baseline-python",
        type=Path,
        help="also serve from this interpreter (another checkout's .venv/bin/python, e.g. "
        "main's), with its own defaults, as the `baseline` server",
    )
    parser.add_argument("--out", default="serve_batch")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    # server label -> (interpreter, extra flags)
    servers_wanted: dict[str, tuple[str, list[str]]] = {}
    if args.baseline_python is not None:
        servers_wanted["baseline"] = (str(args.baseline_python), [])
    for interval in (int(i) for i in args.stream_intervals.split(",") if i):
        servers_wanted[f"interval {interval}"] = (
            sys.executable,
            ["--stream-interval", str(interval)],
        )
    for config in configs:
        adapters_for(config, 1)  # refuses an unknown name before anything starts

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.common import write_adapters
    from loramux.core.config import Settings
    from loramux.core.models import resolve_base_model
    from loramux.server.lora import base_linear_shapes

    info = machine_info()
    print_machine(info)
    words = PASSAGE.split()
    prompts = [" ".join((words[i * 7 :] + words)[: args.prompt_words]) for i in range(args.batch)]
    runs = [(config, label) for label in servers_wanted for config in configs]
    seconds: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    with tempfile.TemporaryDirectory(prefix="loramux-bench-serve-batch-") as tmp:
        root = Path(tmp)
        resolved = resolve_base_model("smollm2-135m-instruct", Settings().models_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved.path))
        shapes = base_linear_shapes(skeleton)
        folders: dict[str, Path] = {}
        if {"one", "k32"} & set(configs):
            count = args.batch if "k32" in configs else 1
            folders |= write_adapters(root / "a", shapes, [16] * count, "r16-")
        if "ranks" in configs:
            ranks = [RANK_CYCLE[i % len(RANK_CYCLE)] for i in range(args.batch)]
            folders |= write_adapters(root / "m", shapes, ranks, "mixed-", seed_offset=1000)
        # Every adapter keeps a slot: the rounds measure compute, not installs.
        slots = ["--max-loaded-adapters", str(max(32, len(folders)))]
        # Every round sends the same prompts: with the prefix cache on, the base model and
        # resident adapters would prefill only what is not cached yet (bench.engine turns it
        # off for the same reason; bench.kv measures it). By env var, which every checkout
        # a --baseline-python server runs understands.
        os.environ["LORAMUX_PREFIX_CACHING"] = "0"
        servers = {}
        try:
            for i, (label, (python, flags)) in enumerate(servers_wanted.items()):
                home = root / f"server-{i}"  # started one after another: loads do not overlap
                home.mkdir()
                server = start_loramux(home, max(len(folders), 1), [*slots, *flags], python)
                servers[label] = server
                server.wait_ready(timeout=900)
                if folders:
                    upload_adapters(server.address, folders)
            for config, label in runs:  # warm-up: compiled kernels, slots, allocations
                adapters = adapters_for(config, args.batch)
                asyncio.run(run_round(servers[label].address, adapters, prompts, 4))
            for rep in range(args.reps):
                for config, label in runs:
                    adapters = adapters_for(config, args.batch)
                    took = asyncio.run(
                        run_round(servers[label].address, adapters, prompts, args.new_tokens)
                    )
                    seconds[config, label].append(took)
                    rate = args.batch * args.new_tokens / took
                    print(
                        f"# rep {rep} {config} ({label}): {took:.2f} s, {rate:.1f} tok/s",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()

    tokens = args.batch * args.new_tokens
    rates = {run: tokens / statistics.median(s) for run, s in seconds.items()}
    rows = []
    for config, label in runs:
        base = rates.get(("base", label))
        rows.append(
            [
                config,
                args.batch,
                label,
                rates[config, label],
                " / ".join(f"{tokens / s:.1f}" for s in seconds[config, label]),
                rates[config, label] / base if base else float("nan"),
            ]
        )
    headers = ["config", "batch", "server", "tok/s (median round)", "each round"]
    table = format_table([*headers, "x base"], rows)
    print(f"\n## serve_batch: {args.batch} calls x {args.new_tokens} new tokens, gRPC")
    print(table, flush=True)
    payload = {
        "benchmark": "serve_batch",
        "machine": info,
        "args": vars(args),
        "seconds": {f"{c} ({label})": s for (c, label), s in seconds.items()},
        "tokens_per_s": {f"{c} ({label})": r for (c, label), r in rates.items()},
        "table": table,
    }
    print(f"# wrote {write_json(args.out, payload, args.results_dir)}")
    return payload


if __name__ == "__main__":
    main()
