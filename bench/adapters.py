"""Adapter load latency: cold (disk -> CPU -> device slot), warm (CPU -> slot), hot, vs PEFT.

    python -m bench.adapters            # ranks 16 and 64, 40 repetitions
    python -m bench.adapters --quick    # rank 16, 10 repetitions

What is timed (wall clock around the call, on the caller's thread, as an API call sees it):

* loramux cold       `adapters.unload(id)` first (back to "stored"), then `adapters.load(id)`:
                     read + check the files on the loader thread, copy into a device slot
                     on the engine thread; `disk->cpu` is the store's own `last_load_seconds`
* loramux warm       the adapter is in CPU memory but another one took the only slot
* loramux hot        the adapter is already in a slot (`load` returns at once)
* request TTFT       time to the first token of a 1-token request naming a cold adapter, a
                     hot one, or none (the base model): what a client sees
* peft load_adapter  `PeftModel.load_adapter(path, adapter_name=...)` (then deleted again)
* peft set_adapter   switching the active adapter to one already loaded

Adapter files sit in the OS page cache (just written), as a server's local store usually
is; a cold read from a cold disk adds the disk's own latency on top.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import (
    MODEL_CHOICES,
    RESULTS_DIR,
    BaseModel,
    cuda_sync,
    format_table,
    load_model,
    machine_info,
    percentile,
    plot_path,
    print_machine,
    pyplot,
    set_threads,
    write_adapters,
    write_json,
)
from loramux.server.threads import in_own_thread

OPS = (
    "loramux cold load",
    "  of which disk->cpu",
    "loramux warm load (cpu->slot)",
    "loramux hot hit",
    "request TTFT, cold adapter",
    "request TTFT, hot adapter",
    "request TTFT, base model",
    "peft load_adapter",
    "peft set_adapter",
)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peft_load(model: Any, name: str, folder: Path, device: Any) -> None:
    model.load_adapter(str(folder), adapter_name=name)
    cuda_sync(device)


def peft_model(model: Any, folder: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), adapter_name="resident").eval()


def peft_round(model: Any, name: str, folder: Path, device: Any) -> tuple[float, float]:
    """PEFT load_adapter then set_adapter of one adapter (seconds each), then delete it."""
    load = timed(partial(peft_load, model, name, folder, device))
    switch = timed(partial(model.set_adapter, name))
    model.set_adapter("resident")
    model.delete_adapter(name)
    return load, switch


def main(argv: Sequence[str] | None = None, base: BaseModel | None = None) -> dict[str, Any]:
    """Run the benchmark; `base` lets a caller share one loaded model between benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--peft-reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="rank 16, 10 (PEFT 5) repetitions")
    parser.add_argument("--out", default="adapters")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.reps, args.peft_reps = "16", 10, 5
    ranks = [int(r) for r in args.ranks.split(",")]

    from loramux.core.config import Settings
    from loramux.server.engine import Engine
    from loramux.server.requests import GenerationRequest, SamplingParams

    set_threads()
    info = machine_info()
    print_machine(info)
    started = time.perf_counter()
    if base is None:
        base = load_model(args.model, args.device)
    linears = base.linear_shapes()
    prompt = base.prompts(1, 16)[0]
    # One device slot: loading a second adapter pushes the first back to CPU memory.
    engine = Engine(
        base.fresh_copy(),
        base.tokenizer,
        Settings(device=str(base.device), max_loaded_adapters=1, max_cpu_adapters=64),
        base.resolved,
    )
    engine.warm_up()
    store = engine.adapters
    samples: dict[tuple[str, int], list[float]] = {}
    adapter_bytes: dict[int, int] = {}

    def note(op: str, rank: int, seconds: float) -> None:
        samples.setdefault((op, rank), []).append(seconds * 1000)

    def ttft(adapter_id: str | None) -> float:
        request = GenerationRequest(
            "ttft", prompt, SamplingParams(max_new_tokens=1, ignore_eos=True), adapter_id
        )
        start = time.perf_counter()
        for event in engine.submit(request):
            if event.error is not None:
                raise RuntimeError(str(event.error))
            break
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="loramux-bench-") as tmp:
        root = Path(tmp)
        for rank in ranks:
            # Two adapters per rank for the store (one to measure, one to push it out of
            # the slot), and PEFT's own copies (PEFT keeps every loaded adapter).
            folders = write_adapters(root, linears, [rank, rank], f"m{rank}-", seed_offset=rank)
            subject, other = (f"m{rank}-0", f"m{rank}-1")
            for adapter_id, folder in folders.items():
                store.register(adapter_id, folder)
            adapter_bytes[rank] = sum(f.stat().st_size for f in folders[subject].iterdir())
            # PEFT's work runs on threads that end (here and below), so that the engine
            # thread is the only one keeping OpenMP workers (loramux.server.threads); the
            # times are taken inside those threads.
            peft = in_own_thread(
                partial(peft_model, base.fresh_copy(), folders[other]), "peft-load"
            )
            store.load(other)
            ttft(None)  # warm the request path (allocations, compiled kernels)
            ttft(other)

            for rep in range(args.reps):
                if store.state(subject) != "stored":
                    store.unload(subject)
                note("loramux cold load", rank, timed(partial(store.load, subject)))
                note("  of which disk->cpu", rank, store.stats()[subject].last_load_seconds)
                note("loramux hot hit", rank, timed(partial(store.load, subject)))
                store.load(other)  # takes the slot; `subject` stays in CPU memory
                note("loramux warm load (cpu->slot)", rank, timed(partial(store.load, subject)))
                note("request TTFT, hot adapter", rank, ttft(subject))
                note("request TTFT, base model", rank, ttft(None))
                store.unload(subject)
                note("request TTFT, cold adapter", rank, ttft(subject))
                if rep < args.peft_reps:
                    round_ = partial(peft_round, peft, f"p{rep}", folders[subject], base.device)
                    load_s, switch_s = in_own_thread(round_, "peft-round")
                    note("peft load_adapter", rank, load_s)
                    note("peft set_adapter", rank, switch_s)
            del peft
    engine.shutdown()

    summary = [
        {
            "op": op,
            "rank": rank,
            "adapter_mb": adapter_bytes[rank] / 1e6,
            "n": len(samples[(op, rank)]),
            "p50_ms": percentile(samples[(op, rank)], 50),
            "p99_ms": percentile(samples[(op, rank)], 99),
            "max_ms": max(samples[(op, rank)]),
        }
        for rank in ranks
        for op in OPS
        if (op, rank) in samples
    ]
    title = f"{args.model} on {info.get('gpu') or info['cpu_model']}: adapter load latency"
    print(f"\n## adapters: {title}")
    table = format_table(
        ["operation", "rank", "adapter MB", "p50 ms", "p99 ms", "max ms", "n"],
        [
            [s["op"], s["rank"], s["adapter_mb"], s["p50_ms"], s["p99_ms"], s["max_ms"], s["n"]]
            for s in summary
        ],
    )
    print(table, flush=True)
    payload = {
        "benchmark": "adapters",
        "machine": info,
        "args": vars(args),
        "summary": summary,
        "table": table,
        "samples_ms": {f"{op} (rank {rank})": v for (op, rank), v in samples.items()},
        "seconds": time.perf_counter() - started,
    }
    print(f"# wrote {write_json(args.out, payload, args.results_dir)}")
    image = plot_path(args.out, args.results_dir)
    plot(summary, image, title)
    print(f"# wrote {image}")
    return payload


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    ranks = sorted({s["rank"] for s in summary})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(ranks)
    ops = [op for op in OPS if any(s["op"] == op for s in summary)]
    for i, rank in enumerate(ranks):
        by_op = {s["op"]: s for s in summary if s["rank"] == rank}
        xs = [j + i * width for j in range(len(ops))]
        p50 = [by_op[op]["p50_ms"] if op in by_op else 0.0 for op in ops]
        p99 = [by_op[op]["p99_ms"] if op in by_op else 0.0 for op in ops]
        ax.bar(xs, p50, width, label=f"rank {rank} p50")
        ax.scatter(xs, p99, marker="_", s=200, color="black", zorder=3)
    ax.set_xticks([j + width * (len(ranks) - 1) / 2 for j in range(len(ops))])
    ax.set_xticklabels([op.strip() for op in ops], rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (bar p50, tick p99)")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
