"""What serving costs: the engine alone against the same work through `loramux serve`.

    python -m bench.serve_gap                       # batch 32, --stream-interval 1 and 8
    python -m bench.serve_gap --stream-intervals 1,4,8 --reps 6

The bare base model (no adapter named), N requests of `--new-tokens` tokens, greedy with
ignore_eos, the prompts of bench.serve_batch. `engine`: an Engine in this process, one
reader thread per request (as a gRPC handler would be). `server@K`: one `loramux serve`
process per --stream-interval K, N concurrent GenerateStream calls (bench.serve_batch's
round). The rounds alternate over all of them within each repetition; every one but the
running one sits idle meanwhile. The gap between `engine` and `server@1` is what the
server adds per token: handler threads, gRPC messages and their completions, the client.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import PASSAGE, RESULTS_DIR, format_table, machine_info, print_machine, write_json
from bench.serve import start_loramux
from bench.serve_batch import run_round


def engine_round(engine: Any, prompts: list[list[int]], new: int) -> float:
    """Seconds until every request's reader thread has read its last event."""
    from loramux.server.requests import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    started = time.perf_counter()
    streams = [
        engine.submit(GenerationRequest(f"gap-{i}", list(p), params)) for i, p in enumerate(prompts)
    ]
    made = [0] * len(streams)

    def read(i: int) -> None:
        for event in streams[i]:
            made[i] += len(event.token_ids)

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    seconds = time.perf_counter() - started
    if any(m != new for m in made):
        raise RuntimeError(f"requests made {made} tokens, expected {new} each")
    return seconds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--stream-intervals", default="1,8", help="one server each")
    parser.add_argument("--out", default="serve_gap")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    from loramux.core.config import Settings
    from loramux.server.engine import Engine

    words = PASSAGE.split()
    texts = [" ".join((words[i * 7 :] + words)[: args.prompt_words]) for i in range(args.batch)]
    intervals = [int(i) for i in args.stream_intervals.split(",") if i]
    rounds: dict[str, Callable[[int], float]] = {}
    with tempfile.TemporaryDirectory(prefix="loramux-bench-serve-gap-") as tmp:
        servers = []
        engine = None
        try:
            for interval in intervals:
                root = Path(tmp) / f"interval-{interval}"
                root.mkdir()
                flags = ["--max-loaded-adapters", "32", "--stream-interval", str(interval)]
                server = start_loramux(root, 1, flags)
                servers.append(server)
                server.wait_ready(timeout=900)
                address = server.address
                rounds[f"server@{interval}"] = lambda n, a=address: asyncio.run(
                    run_round(a, [""] * args.batch, texts, n)
                )
            engine = Engine.create(Settings(device="cpu", max_queued_requests=4096))
            # After the engine's start: importing peft & co. on this thread earlier cost the
            # in-process engine a quarter of its speed (measured, cause not pinned down).
            info = machine_info()
            print_machine(info)
            prompts = [engine.tokenize(t) for t in texts]
            rounds = {"engine": lambda n: engine_round(engine, prompts, n), **rounds}
            for run in rounds.values():  # warm-up
                run(4)
            seconds: dict[str, list[float]] = {name: [] for name in rounds}
            for rep in range(args.reps):
                for name, run in rounds.items():
                    took = run(args.new_tokens)
                    seconds[name].append(took)
                    rate = args.batch * args.new_tokens / took
                    print(f"# rep {rep} {name}: {took:.2f} s, {rate:.1f} tok/s", flush=True)
        finally:
            for server in servers:
                server.stop()
            if engine is not None:
                engine.shutdown()

    tokens = args.batch * args.new_tokens
    rates = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    rows = [
        [
            name,
            rates[name],
            " / ".join(f"{tokens / s:.1f}" for s in seconds[name]),
            rates[name] / rates["engine"],
        ]
        for name in rounds
    ]
    table = format_table(["run", "tok/s (median round)", "each round", "x engine"], rows)
    print(f"\n## serve_gap: {args.batch} requests x {args.new_tokens} new tokens, base model")
    print(table, flush=True)
    payload = {
        "benchmark": "serve_gap",
        "machine": info,
        "args": vars(args),
        "seconds": seconds,
        "tokens_per_s": rates,
        "table": table,
    }
    print(f"# wrote {write_json(args.out, payload, args.results_dir)}")
    return payload


if __name__ == "__main__":
    main()
