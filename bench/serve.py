"""Open-loop load over gRPC: LoRAMux's server against a naive one-at-a-time PEFT server.

    python -m bench.serve                 # 100 adapters, Zipf alpha 1, rate sweep to saturation
    python -m bench.serve --quick         # 10 adapters, one rate (2 req/s) for 8 s

Both servers run as their own processes on this machine, fed the same request sequence by
the same client code (loramux.v1.InferenceService.GenerateStream):

* loramux   `loramux serve` (the product), adapters uploaded through the API
* naive     bench/naive_server.py: PEFT with every adapter loaded, one request at a time

Load (as S-LoRA's and vLLM's benchmarks): Poisson arrivals at a fixed rate for `--duration`
seconds; each request names one of N rank-16 all-linear adapters drawn with Zipf
popularity (P(i) ~ 1/i^alpha); prompt and output lengths drawn uniformly from ranges;
greedy decoding with ignore_eos, so every request makes exactly its drawn output length.
The sweep doubles the rate until a server's completed-request rate falls below 80% of the
offered rate; the highest completed rate seen is its saturation throughput.

Latencies are measured from each request's scheduled arrival time (an open-loop client
never waits, so queueing shows up in TTFT instead of vanishing): TTFT to the first token,
inter-token latency between consecutive tokens of a request, p50/p90/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    PASSAGE,
    RESULTS_DIR,
    format_table,
    machine_info,
    percentile,
    plot_path,
    print_machine,
    pyplot,
    write_json,
)

SYSTEMS = ("loramux", "naive")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 180.0


@dataclass
class Planned:
    at: float  # seconds after the start of the step
    adapter: str
    prompt: str
    output_tokens: int


@dataclass
class Outcome:
    arrival: float
    first_token: float | None = None
    done: float | None = None
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zipf_weights(n: int, alpha: float) -> list[float]:
    return [1.0 / (i + 1) ** alpha for i in range(n)]


def plan_requests(
    rate: float,
    duration: float,
    adapters: list[str],
    alpha: float,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    words: list[str],
    seed: int,
) -> list[Planned]:
    """The same seeded sequence for both servers at a given rate."""
    rng = random.Random(seed)
    weights = zipf_weights(len(adapters), alpha)
    plan, t = [], rng.expovariate(rate)
    while t < duration:
        # ~1.3 tokens per English word for SmolLM2's tokenizer; the server counts exactly.
        words_wanted = max(1, int(rng.randint(*prompt_range) / 1.3))
        start = rng.randrange(len(words))
        prompt = " ".join((words[start:] + words)[:words_wanted])
        plan.append(
            Planned(
                at=t,
                adapter=rng.choices(adapters, weights)[0],
                prompt=prompt,
                output_tokens=rng.randint(*output_range),
            )
        )
        t += rng.expovariate(rate)
    return plan


async def run_step(address: str, plan: list[Planned]) -> tuple[list[Outcome], float]:
    """Send `plan` open-loop; returns the outcomes and the step's start time."""
    import grpc

    from loramux.v1 import loramux_pb2 as pb
    from loramux.v1 import loramux_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        start = time.perf_counter()

        async def one(item: Planned) -> Outcome:
            outcome = Outcome(arrival=start + item.at)
            request = pb.GenerateRequest(
                adapter=item.adapter,
                prompt=item.prompt,
                max_new_tokens=item.output_tokens,
                ignore_eos=True,
            )
            try:
                call = stub.GenerateStream(request, timeout=DEADLINE_S)
                async for message in call:
                    now = time.perf_counter()
                    if message.token_ids:
                        outcome.token_times.extend([now] * len(message.token_ids))
                    if message.HasField("usage"):
                        outcome.prompt_tokens = message.usage.prompt_tokens
                outcome.done = time.perf_counter()
            except grpc.aio.AioRpcError as error:
                outcome.error = error.code().name
            if outcome.token_times:
                outcome.first_token = outcome.token_times[0]
            return outcome

        tasks = []
        for item in plan:
            delay = start + item.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(item)))
        outcomes = list(await asyncio.gather(*tasks))
        return outcomes, start


def measure(
    outcomes: list[Outcome], offered: float, duration: float, start: float
) -> dict[str, Any]:
    """Rates are over [step start, last completion]: a server that keeps up finishes soon
    after the arrivals stop (span ~ duration); one that does not takes longer to drain."""
    ok = [o for o in outcomes if o.error is None and o.done is not None]
    ttft = [(o.first_token - o.arrival) * 1000 for o in ok if o.first_token is not None]
    itl = [(b - a) * 1000 for o in ok for a, b in itertools.pairwise(o.token_times)]
    e2e = [(o.done - o.arrival) * 1000 for o in ok if o.done is not None]
    last = max((o.done for o in ok if o.done is not None), default=start)
    span = max(last - start, duration)
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "offered_rps": offered,
        "arrivals_rps": len(outcomes) / duration,  # the Poisson draw's actual rate
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": errors,
        "achieved_rps": len(ok) / span,
        "output_tokens_per_s": sum(len(o.token_times) for o in ok) / span,
        "span_s": span,
        "ttft_ms": {q: percentile(ttft, q) for q in (50, 90, 99)},
        "itl_ms": {q: percentile(itl, q) for q in (50, 90, 99)},
        "e2e_ms": {q: percentile(e2e, q) for q in (50, 90, 99)},
        "mean_prompt_tokens": sum(o.prompt_tokens for o in ok) / max(1, len(ok)),
    }


# ---- servers ----
class ServerProcess:
    def __init__(self, name: str, command: list[str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        self.address = f"127.0.0.1:{port}"
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends it and its children
            cwd=REPO_ROOT,
        )

    def wait_ready(self, timeout: float) -> None:
        """Until ModelInfo answers (the model is loaded and the port serves)."""
        import grpc

        from loramux.v1 import loramux_pb2 as pb
        from loramux.v1 import loramux_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
                try:
                    stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()


def start_loramux(
    root: Path, adapters: int, extra: Sequence[str] = (), python: str = sys.executable
) -> ServerProcess:
    """`loramux serve` on a free port, dev mode, quotas out of the way; `python` may be
    another checkout's interpreter (its own code, for before/after comparisons)."""
    from loramux.core.config import Settings

    home = root / "home"
    home.mkdir()
    (home / "models").symlink_to(Settings().models_dir, target_is_directory=True)
    port = free_port()
    command = [
        python,
        "-m",
        "loramux.cli",
        "serve",
        "--home",
        str(home),
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--device",
        "cpu",
        "--log-level",
        "WARNING",
        "--dev",  # no keys: the benchmark measures serving, on 127.0.0.1
        # One tenant sends all the load: its quotas must not be the bottleneck.
        "--tenant-max-concurrent",
        "4096",
        "--tenant-max-queued",
        "4096",
        "--tenant-max-adapters",
        str(max(100, adapters)),
        "--max-queued-requests",
        "4096",
        *extra,
    ]
    return ServerProcess("loramux", command, port, root / "loramux.log")


def start_naive(root: Path, adapters_dir: Path) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--port",
        str(port),
        "--adapters",
        str(adapters_dir),
    ]
    return ServerProcess("naive", command, port, root / "naive.log")


def upload_adapters(address: str, folders: dict[str, Path]) -> float:
    """Through the public API, as a user would; warms each into memory with LoadAdapter."""
    from loramux.client import LoramuxClient

    started = time.perf_counter()
    with LoramuxClient(address) as client:
        for name, folder in folders.items():
            client.upload_adapter(folder, name)
        for name in folders:
            client.load_adapter(name)  # disk -> CPU memory (all fit), like PEFT's preload
    return time.perf_counter() - started


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=1.0, help="Zipf popularity exponent")
    parser.add_argument("--rates", default="0.5,1,2,4,8,16", help="req/s, ascending")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--prompt-tokens", default="8:64", help="uniform range lo:hi")
    parser.add_argument("--output-tokens", default="8:32", help="uniform range lo:hi")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10 adapters, 2 req/s, 8 s")
    parser.add_argument("--out", default="serve")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.adapters, args.rates, args.duration = 10, "2", 8.0
    rates = [float(r) for r in args.rates.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    prompt_range, output_range = parse_range(args.prompt_tokens), parse_range(args.output_tokens)

    from bench.common import write_adapters
    from loramux.core.config import Settings
    from loramux.core.models import resolve_base_model

    info = machine_info()
    print_machine(info)
    started = time.perf_counter()
    words = PASSAGE.split()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loramux-bench-serve-") as tmp:
        root = Path(tmp)
        # Adapter shapes from the model's config alone (no weights loaded here).
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from loramux.server.lora import base_linear_shapes

        resolved = resolve_base_model("smollm2-135m-instruct", Settings().models_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved.path))
        adapters_dir = root / "adapters"
        folders = write_adapters(
            adapters_dir, base_linear_shapes(skeleton), [16] * args.adapters, "tenant-adapter-"
        )
        names = list(folders)
        servers: dict[str, ServerProcess] = {}
        try:
            if "loramux" in systems:
                servers["loramux"] = start_loramux(root, args.adapters)
            if "naive" in systems:
                servers["naive"] = start_naive(root, adapters_dir)
            for server in servers.values():
                server.wait_ready(timeout=900)
            if "loramux" in servers:
                seconds = upload_adapters(servers["loramux"].address, folders)
                print(f"# uploaded and loaded {len(folders)} adapters in {seconds:.0f}s")
            print(f"# servers ready after {time.perf_counter() - started:.0f}s", flush=True)
            # Warm-up (untimed): compiled kernels, allocations, the first prefills.
            warm = plan_requests(2.0, 3.0, names, args.alpha, (16, 16), (4, 4), words, seed=999)
            for server in servers.values():
                asyncio.run(run_step(server.address, warm))
            saturated: set[str] = set()
            for step, rate in enumerate(rates):
                plan = plan_requests(
                    rate,
                    args.duration,
                    names,
                    args.alpha,
                    prompt_range,
                    output_range,
                    words,
                    seed=args.seed + step,
                )
                for name, server in servers.items():
                    if name in saturated:
                        continue
                    outcomes, step_start = asyncio.run(run_step(server.address, plan))
                    row = {"system": name, **measure(outcomes, rate, args.duration, step_start)}
                    results.append(row)
                    print(
                        f"# {name} at {rate:g} req/s: {row['achieved_rps']:.2f} req/s done, "
                        f"TTFT p50 {row['ttft_ms'][50]:.0f} ms, "
                        f"ITL p50 {row['itl_ms'][50]:.0f} ms, errors {row['errors'] or 0}",
                        flush=True,
                    )
                    if row["achieved_rps"] < 0.8 * row["arrivals_rps"] or row["errors"]:
                        saturated.add(name)
                if saturated >= set(servers):
                    break
        finally:
            for server in servers.values():
                server.stop()

    saturation = {
        name: max((r["achieved_rps"] for r in results if r["system"] == name), default=0.0)
        for name in systems
    }
    tokens = {
        name: max((r["output_tokens_per_s"] for r in results if r["system"] == name), default=0.0)
        for name in systems
    }
    title = (
        f"{args.adapters} adapters, Zipf alpha {args.alpha:g}, prompts {args.prompt_tokens} / "
        f"outputs {args.output_tokens} tokens, {args.duration:g} s per rate"
    )
    print(f"\n## serve: {title}")
    table = format_table(
        [
            "system",
            "offered req/s",
            "done req/s",
            "out tok/s",
            "TTFT p50/p90/p99 ms",
            "ITL p50/p90/p99 ms",
            "errors",
            "n",
        ],
        [
            [
                r["system"],
                r["offered_rps"],
                r["achieved_rps"],
                r["output_tokens_per_s"],
                "/".join(f"{r['ttft_ms'][q]:.0f}" for q in (50, 90, 99)),
                "/".join(f"{r['itl_ms'][q]:.0f}" for q in (50, 90, 99)),
                sum(r["errors"].values()),
                r["requests"],
            ]
            for r in results
        ],
    )
    ratio = (
        saturation["loramux"] / saturation["naive"]
        if saturation.get("naive") and "loramux" in saturation
        else float("nan")
    )
    verdict = "\n".join(
        f"saturation throughput {name}: {saturation[name]:.2f} req/s, "
        f"{tokens[name]:.0f} output tokens/s"
        for name in systems
    ) + (f"\nloramux / naive: {ratio:.2f}x" if ratio == ratio else "")
    print(table)
    print(verdict, flush=True)
    payload = {
        "benchmark": "serve",
        "machine": info,
        "args": vars(args),
        "results": results,
        "saturation_rps": saturation,
        "saturation_output_tokens_per_s": tokens,
        "loramux_vs_naive": ratio,
        "table": table + "\n\n" + verdict,
        "seconds": time.perf_counter() - started,
    }
    print(f"# wrote {write_json(args.out, payload, args.results_dir)}")
    image = plot_path(args.out, args.results_dir)
    plot(results, image, title)
    print(f"# wrote {image}")
    return payload


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, color in zip(SYSTEMS, ("tab:blue", "tab:orange"), strict=True):
        rows = [r for r in results if r["system"] == name]
        if not rows:
            continue
        offered = [r["offered_rps"] for r in rows]
        left.plot(offered, [r["achieved_rps"] for r in rows], marker="o", color=color, label=name)
        right.plot(
            offered, [r["ttft_ms"][50] for r in rows], marker="o", color=color, label=f"{name} p50"
        )
        right.plot(
            offered,
            [r["ttft_ms"][99] for r in rows],
            marker="x",
            linestyle="--",
            color=color,
            label=f"{name} p99",
        )
    top = max((r["offered_rps"] for r in results), default=1.0)
    left.plot([0, top], [0, top], color="gray", linestyle=":", label="offered")
    left.set_xlabel("offered req/s")
    left.set_ylabel("completed req/s")
    left.legend()
    right.set_xlabel("offered req/s")
    right.set_ylabel("TTFT ms")
    right.set_yscale("log")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
