"""Run every benchmark and print their tables together.

    python -m bench.run_all --quick     # `make bench`: under 5 minutes on a 2-core CPU
    python -m bench.run_all             # the full CPU runs behind docs/performance.md (~1 h)
    python -m bench.run_all --gpu       # bench/gpu.sh: engine + adapters on a random
                                        # Llama-3-8B-shaped NF4 model, one CUDA device

On the CPU each benchmark runs in its own process (a failure or a leak in one cannot skew
the next). On the GPU both run in one process that builds the 8B model once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Sequence

from bench.common import RESULTS_DIR, machine_info, print_machine, set_threads

CPU_BENCHMARKS = ("engine", "adapters", "train", "serve")

# The GPU run must fit in 8 minutes, building the model included (about a minute).
GPU_ENGINE_ARGS = [
    "--model",
    "llama3-8b-random",
    "--device",
    "cuda",
    "--batches",
    "1,8,32",
    "--reps",
    "3",
    "--budget-s",
    "240",
    "--distinct-files",
    "8",
    "--out",
    "gpu_engine",
]
GPU_ADAPTER_ARGS = [
    "--model",
    "llama3-8b-random",
    "--device",
    "cuda",
    "--ranks",
    "16",
    "--reps",
    "15",
    "--peft-reps",
    "5",
    "--out",
    "gpu_adapters",
]


def serve_available() -> bool:
    """The serve benchmark needs the gRPC server and its generated code."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("loramux.server.app", "loramux.v1.loramux_pb2_grpc")
    )


def run_cpu(quick: bool) -> int:
    failures = 0
    tables: list[tuple[str, str]] = []
    started = time.perf_counter()
    for name in CPU_BENCHMARKS:
        if name == "serve" and not serve_available():
            tables.append((name, "skipped: loramux.server.app is not there yet"))
            continue
        command = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
        if quick:
            command += ["--out", f"quick_{name}"]
        print(f"\n# === {' '.join(command[1:])}", flush=True)
        bench_started = time.perf_counter()
        code = subprocess.run(command, check=False).returncode
        seconds = time.perf_counter() - bench_started
        result = RESULTS_DIR / f"{'quick_' if quick else ''}{name}.json"
        if code != 0 or not result.is_file():
            failures += 1
            tables.append((name, f"FAILED (exit {code}) after {seconds:.0f}s"))
            continue
        payload = json.loads(result.read_text())
        tables.append((f"{name} ({seconds:.0f}s)", payload.get("table", "")))
    print(f"\n# === all benchmarks in {time.perf_counter() - started:.0f}s")
    for name, table in tables:
        print(f"\n## {name}\n{table}")
    return 1 if failures else 0


def run_gpu(smoke: bool = False) -> int:
    """The GPU run; `smoke` takes the same path on the CPU with a toy-sized random model."""
    import torch

    from bench import adapters, engine
    from bench.common import load_model

    model, device = ("llama-tiny-random", "cpu") if smoke else ("llama3-8b-random", "cuda")
    if not smoke and not torch.cuda.is_available():
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 2
    set_threads()
    print_machine(machine_info())
    started = time.perf_counter()
    base = load_model(model, device)
    memory = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    print(
        f"# random {model} model built and quantised to NF4 in "
        f"{time.perf_counter() - started:.0f}s; {memory:.1f} GiB on the GPU",
        flush=True,
    )

    def adapt(args: list[str]) -> list[str]:
        swap = {"llama3-8b-random": model, "cuda": device}
        swapped = [swap.get(a, a) for a in args]
        return [*swapped[:-1], f"smoke_{swapped[-1]}"] if smoke else swapped

    engine_result = engine.main(adapt(GPU_ENGINE_ARGS), base=base)
    adapter_result = adapters.main(adapt(GPU_ADAPTER_ARGS), base=base)
    print(f"\n# === GPU benchmarks done in {time.perf_counter() - started:.0f}s")
    print(f"\n## engine\n{engine_result['table']}\n\n## adapters\n{adapter_result['table']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short runs (make bench)")
    mode.add_argument("--gpu", action="store_true", help="engine + adapters on one CUDA GPU")
    mode.add_argument("--gpu-smoke", action="store_true", help="--gpu's path, toy model, CPU")
    args = parser.parse_args(argv)
    if args.gpu or args.gpu_smoke:
        return run_gpu(smoke=args.gpu_smoke)
    return run_cpu(args.quick)


if __name__ == "__main__":
    sys.exit(main())
