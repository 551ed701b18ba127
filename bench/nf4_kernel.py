"""One SmolLM2 decoder layer's 4-bit projections: bitsandbytes against the native NF4 kernel.

    python -m bench.nf4_kernel                       # 1, 4, 32, 128 rows, the engine's threads
    python -m bench.nf4_kernel --threads 1 --rows 1,32

Each of layer 0's seven projections (q/k/v/o, gate/up/down) is called on the same random
bf16 input through bitsandbytes' `Linear4bit` and through `NativeNf4Linear` (one token per
row: the kernel's matmul), alternating, and the median call time of each is printed with
the sum over the seven (x30 for the whole model's 4-bit layers, less everything else a
step does). Side by side in one process, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from bench.common import load_model, machine_info, print_machine


def _median_us(layer: Callable[[torch.Tensor], object], x: torch.Tensor, reps: int) -> float:
    layer(x)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,4,32,128", help="comma-separated row counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every CPU)")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args(argv)

    from loramux.server.nf4 import four_bit_layers
    from loramux.server.nf4.native import NativeNf4Linear, load_kernel
    from loramux.server.threads import available_cpus

    torch.set_num_threads(args.threads or available_cpus())
    print_machine(machine_info())
    kernel = load_kernel()
    base = load_model("smollm2", "cpu")
    layers = [(n, m) for n, m in four_bit_layers(base.model) if n.startswith("model.layers.0.")]
    print("| rows | projection | bitsandbytes us | native us | ratio |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            total_bnb = total_native = 0.0
            for name, layer in layers:
                native = NativeNf4Linear(layer, kernel)
                x = torch.randn(rows, 1, layer.in_features).bfloat16()
                reps = max(5, args.reps // max(1, rows // 16))
                bnb_us, native_us = 0.0, 0.0
                for _ in range(2):  # alternating halves
                    bnb_us += _median_us(layer, x, reps) / 2
                    native_us += _median_us(native, x, reps) / 2
                total_bnb += bnb_us
                total_native += native_us
                short = name.rsplit(".", 1)[-1]
                print(
                    f"| {rows} | {short} | {bnb_us:.0f} | {native_us:.0f} | "
                    f"{bnb_us / native_us:.1f}x |"
                )
            print(
                f"| {rows} | **7 projections** | {total_bnb:.0f} | {total_native:.0f} | "
                f"**{total_bnb / total_native:.1f}x** |",
                flush=True,
            )


if __name__ == "__main__":
    main()
