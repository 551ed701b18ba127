"""The Triton LoRA backend beside the compiled one and the bare base, by adapter count.

    python -m bench.lora_backends --model llama3-8b-random --device cuda   # bench/gpu.sh
    python -m bench.lora_backends --dry-run    # bench/gpu.sh --dry-run: the same script on
                                               # the CPU, tiny model, Triton interpreted

Systems, each an engine on its own copy of the same random NF4 base, fed the same prompts:

* base      the engine with enable_lora=False (no wrappers)
* triton    --lora-kernel triton --attention-kernel triton
* compiled  --lora-kernel compiled (torch.compile'd gather-reduce; the attention: auto)

For each adapter count N (default 1, 8, 32, 128, 1,000 rank-16 all-linear adapters;
files hard-linked beyond 8 distinct ones, see bench.common.write_adapters), a batch of
`--batch` rows spreads over N adapters: repetition r's row i uses adapter
(r x batch + i) mod N, so with more adapters than the `--slots` device slots every
repetition loads adapters into slots (evicting others), as a server with many tenants
does. Decode tokens/s per system and the ratio to `base` in the same repetition, median
over repetitions (bench.engine's timing: decode steps only, prefill apart).

The dry run checks that this script works, not speed: on the CPU the Triton kernels run
through Triton's interpreter (numpy, per program) and `compiled` is replaced by `eager`
(no minutes of Inductor compilation in CI). Its numbers mean nothing and are not recorded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    MODEL_CHOICES,
    RESULTS_DIR,
    format_table,
    load_model,
    machine_info,
    median,
    print_machine,
    set_threads,
    write_adapters,
    write_json,
)

DRY_RUN_ARGS = [
    "--model",
    "llama-tiny-random",
    "--device",
    "cpu",
    "--counts",
    "1,8",
    "--batch",
    "4",
    "--slots",
    "4",
    "--reps",
    "1",
    "--new-tokens",
    "3",
    "--prompt-tokens",
    "8",
    "--compare-kernel",
    "eager",
    "--out",
    "dry_run_lora_backends",
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--model", choices=MODEL_CHOICES, default="llama3-8b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--counts", default="1,8,32,128,1000", help="adapter counts")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--slots", type=int, default=128, help="--max-loaded-adapters")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--compare-kernel", default="compiled", help="the other LoRA kernel")
    parser.add_argument("--out", default="lora_backends", help="results file name")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.dry_run:
        args = parser.parse_args([*DRY_RUN_ARGS, "--results-dir", str(args.results_dir)])
        args.dry_run = True
    counts = [int(c) for c in args.counts.split(",")]
    if args.device == "cpu":  # before triton's first import (loramux.server.triton_runtime)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    set_threads()
    info = machine_info()
    print_machine(info)

    from bench.engine import EngineSystem

    base = load_model(args.model, args.device)
    prompts = base.prompts(args.batch, args.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="loramux-lora-backends-") as tmp:
        names = write_adapters(
            Path(tmp), base.linear_shapes(), [16] * max(counts), "a", distinct_files=8
        )
        systems = {
            "base": EngineSystem(base, enable_lora=False, slots=1, max_batch=args.batch),
            "triton": EngineSystem(
                base,
                enable_lora=True,
                slots=args.slots,
                max_batch=args.batch,
                adapters=names,
                lora_kernel="triton",
                attention_kernel="triton",
            ),
            args.compare_kernel: EngineSystem(
                base,
                enable_lora=True,
                slots=args.slots,
                max_batch=args.batch,
                adapters=names,
                lora_kernel=args.compare_kernel,
            ),
        }
        ids = list(names)
        results: list[dict[str, Any]] = []
        try:
            for count in counts:
                for rep in range(args.reps):
                    rows = [ids[(rep * args.batch + i) % count] for i in range(args.batch)]
                    for system, runner in systems.items():
                        m = runner.run(
                            f"{system}-k{count}",
                            args.batch,
                            rep,
                            prompts,
                            [None] * args.batch if system == "base" else list(rows),
                            new_tokens=args.new_tokens,
                        )
                        results.append(
                            {"system": system, "adapters": count, "rep": rep, **_figures(m)}
                        )
        finally:
            for runner in systems.values():
                runner.shutdown()
    table = summarise(results, list(systems), counts)
    print(table)
    payload = {"machine": info, "args": vars(args), "results": results, "table": table}
    write_json(args.out, payload, args.results_dir)
    return payload


def _figures(m: Any) -> dict[str, float]:
    return {"decode_tps": m.decode_tps, "e2e_tps": m.e2e_tps, "e2e_s": m.e2e_s}


def summarise(results: list[dict[str, Any]], systems: list[str], counts: list[int]) -> str:
    """Median decode tokens/s per system and adapter count, and its ratio to base."""
    rows = []
    for count in counts:
        for system in systems:
            mine = [r for r in results if r["system"] == system and r["adapters"] == count]
            ratios = [
                r["decode_tps"] / b["decode_tps"]
                for r in mine
                for b in results
                if b["system"] == "base" and b["adapters"] == count and b["rep"] == r["rep"]
            ]
            rows.append(
                [
                    count,
                    system,
                    f"{median(r['decode_tps'] for r in mine):.1f}",
                    f"{median(ratios):.3f}x",
                ]
            )
    return format_table(["adapters", "system", "decode tok/s", "vs base"], rows)


if __name__ == "__main__":
    main()
