"""Where a decode step's time goes: torch.profiler over the engine's model runner.

    python -m bench.profile_engine --batch 32 --adapters 32     # LoRAMux, 32 adapters
    python -m bench.profile_engine --batch 32 --adapters 0      # wrappers, no adapter
    python -m bench.profile_engine --batch 32 --bare            # enable_lora=False

The runner is driven directly on the engine's own thread between its steps (no request
is submitted), so the profile holds exactly the model passes: one prefill, warm-up decode
steps, then `--steps` profiled decode steps. Prints the step time and the top operators by self CPU
time grouped by input shape, and writes a Chrome trace to bench/results/profile_<config>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

from bench.common import RESULTS_DIR, load_model, machine_info, print_machine, set_threads
from bench.common import write_adapters as write_random_adapters


def _nf4_share(step: Any, steps: int) -> tuple[float, int] | None:
    """Per step: ms inside the native NF4 layers' forward, and their call count (None when
    the 4-bit layers are bitsandbytes'). Timed by wrapping the forward for `steps` steps."""
    from loramux.server.nf4.native import NativeNf4Linear

    original = NativeNf4Linear.forward
    spent = [0.0, 0]

    def timed(self: NativeNf4Linear, x: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, x)
        finally:
            spent[0] += time.perf_counter() - started
            spent[1] += 1

    NativeNf4Linear.__call__ = timed  # type: ignore[method-assign]
    try:
        for _ in range(steps):
            step()
    finally:
        NativeNf4Linear.__call__ = original  # type: ignore[method-assign]
    if not spent[1]:
        return None
    return spent[0] / steps * 1000, int(spent[1]) // steps


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters in the batch")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bare", action="store_true", help="engine with enable_lora=False")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--lora-kernel", default="auto", help="auto, native, compiled or eager (--lora-kernel)"
    )
    parser.add_argument("--nf4-kernel", default="auto", help="auto, native or bnb (--nf4-kernel)")
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    args = parser.parse_args(argv)

    from loramux.core.config import Settings
    from loramux.server.engine import Engine
    from loramux.server.runner import DecodeBatch, PrefillBatch

    set_threads()
    print_machine(machine_info())
    base = load_model(args.model, args.device)
    engine = Engine(
        base.fresh_copy(),
        base.tokenizer,
        Settings(
            device=str(base.device),
            max_batch_size=max(32, args.batch),
            lora_kernel=args.lora_kernel,
            nf4_kernel=args.nf4_kernel,
        ),
        base.resolved,
        enable_lora=not args.bare,
    )
    engine.warm_up()
    slots = [0] * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        if not args.bare and args.adapters:
            folders = write_random_adapters(
                Path(tmp), base.linear_shapes(), [args.rank] * args.adapters, "a"
            )
            for name, folder in folders.items():
                engine.adapters.register(name, folder)
                engine.adapters.load(name)
            # The store has no public "which slot" query; the runner needs slot numbers.
            entries = engine.adapters._entries
            slots = [entries[f"a{i % args.adapters}"].slot or 0 for i in range(args.batch)]
    prompts = base.prompts(args.batch, 32)
    config = "bare" if args.bare else f"k{args.adapters}"
    runner = engine.runner

    def profile_steps() -> tuple[float, Any]:
        position = 32
        tokens = [5] * args.batch
        pool = engine.blocks
        most = 32 + 3 + 3 * args.steps  # prompt, warm-up steps, three timed runs
        tables = [pool.allocate(pool.blocks_for(most)) or [] for _ in range(args.batch)]

        def step() -> None:
            nonlocal position
            runner.decode(DecodeBatch(tokens, [position] * args.batch, slots, tables))
            position += 1

        runner.prefill(PrefillBatch(prompts, slots, tables))
        for _ in range(3):
            step()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        plain_ms = (time.perf_counter() - started) / args.steps * 1000
        nf4_ms = _nf4_share(step, args.steps)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                step()
        for table in tables:
            pool.release(table)
        return plain_ms, nf4_ms, prof

    # On the engine thread, between its steps (no request is running): the passes see the
    # engine's own torch thread settings, as in serving.
    plain_ms, nf4_ms, prof = engine.run_on_engine_thread(profile_steps)
    engine.shutdown()
    print(f"\n## {config}, batch {args.batch}: {plain_ms:.1f} ms per decode step (unprofiled)")
    if nf4_ms is not None:
        print(
            f"# native NF4 layers: {nf4_ms[0]:.1f} ms per step in {nf4_ms[1]} calls (their "
            "Python wrapper included; the kernel runs outside torch's ops, so the operator "
            "table below does not list it)"
        )
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total",
        row_limit=args.rows,
        max_name_column_width=30,
        max_shapes_column_width=60,
    )
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    trace = RESULTS_DIR / f"profile_{config}_b{args.batch}.json"
    prof.export_chrome_trace(str(trace))
    print(f"# wrote {trace}")


if __name__ == "__main__":
    main()
