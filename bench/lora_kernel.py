"""The native LoRA kernel's read bandwidth on SmolLM2's shapes, beside a plain read.

    python -m bench.lora_kernel                         # every configuration, this checkout
    python -m bench.lora_kernel --configs k32 --steps 30
    python -m bench.lora_kernel --source a.cpp --source b.cpp   # kernel variants side by side

A "step" is what one batch-32 decode step asks of the kernel on SmolLM2-135M with
all-linear adapters: 120 group calls (30 layers x q/k/v 576 -> 576/192/192, o 576 -> 576,
gate/up 576 -> 1536/1536, down 1536 -> 576), each group with its own slot stacks, as the
engine holds them (`ClassStack`). Configurations:

    k32     batch 32, 32 distinct rank-16 adapters (one per row): 314 MB a step
    ranks   batch 32, 32 distinct adapters of ranks 8/16/32/64 (8 of each)
    one32   batch 32, every row on one rank-16 adapter
    one1    batch 1, one rank-16 adapter

Every weight comes from DRAM, as in the engine (whose base-model weights pass through the
caches between steps): a 64 MB buffer is read between steps, untimed. For each
configuration the table gives the median step time and the adapter bytes read per second
(A, row_scale and B of each distinct adapter in a call, once), and the same for
`plain_read.cpp`, which reads exactly those bytes in the same 120 calls and does nothing
else: the machine's bandwidth for this access pattern. Sources (`--source`) run
alternating within each repetition, so the machine's load hits them alike; run under the
bench lock (`flock /work/bench.lock ...`), at normal priority.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS_DIR, machine_info, median, print_machine, set_threads, write_json
from loramux.server.lora.backend.native import SOURCE as DEFAULT_SOURCE

LAYERS = 30
HIDDEN, INTERMEDIATE, KV = 576, 1536, 192
# (name, in_features, out_features per member): SmolLM2-135M's fused LoRA groups
GROUPS = (
    ("qkv", HIDDEN, (HIDDEN, KV, KV)),
    ("o", HIDDEN, (HIDDEN,)),
    ("gate_up", HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    ("down", INTERMEDIATE, (HIDDEN,)),
)
CONFIGS = {  # name -> (batch rows, rank of each row's adapter; equal entries share one)
    "k32": (32, [16] * 32),
    "ranks": (32, [8, 16, 32, 64] * 8),
    "one32": (32, [16]),
    "one1": (1, [16]),
}
FLUSH_BYTES = 64 << 20  # twice the L3


@dataclass
class Group:
    """One fused group's slot stacks and a call's arguments."""

    in_features: int
    outs: tuple[int, ...]
    plan: torch.Tensor  # [K, 4 + M] int64, as CpuNativeBackend builds it
    outs_t: torch.Tensor  # [M] int64
    stacks: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]  # (A, scale, Bts)
    x: torch.Tensor  # [n, in] bf16
    ys: list[torch.Tensor]  # M x [n, out_m] bf16: the layers' outputs, deltas added in place
    ys_ptrs: ctypes.Array[ctypes.c_int64]  # their addresses, as the kernel takes them
    route: torch.Tensor  # [n, 2] int64: (class width, index)
    addresses: torch.Tensor  # [R] int64: every weight region a call reads
    sizes: torch.Tensor  # [R] int64: its bytes
    weight_bytes: int


def build_groups(rows: int, ranks: list[int], seed: int, layers: int = LAYERS) -> list[Group]:
    """4 groups per layer whose batch rows use adapters of `ranks` (row t: adapter t % len)."""
    generator = torch.Generator().manual_seed(seed)
    widths = sorted(set(ranks))
    capacity = {w: ranks.count(w) for w in widths}
    # adapter j -> (class width, index in that class's stack)
    slot: list[tuple[int, int]] = []
    seen = dict.fromkeys(widths, 0)
    for rank in ranks:
        slot.append((rank, seen[rank]))
        seen[rank] += 1
    # rows take adapters in a shuffled order, as a batch's rows do slots
    adapter_of_row = torch.randperm(rows, generator=generator) % len(ranks)
    route = torch.tensor([slot[int(j)] for j in adapter_of_row], dtype=torch.int64)
    used = sorted({slot[int(j)] for j in adapter_of_row})
    groups = []
    for _ in range(layers):
        for _name, in_features, outs in GROUPS:
            members = len(outs)
            stacks, table, regions, weight_bytes = [], [], [], 0
            for width in widths:
                c = capacity[width]
                a = (torch.randn(c, members * width, in_features, generator=generator) * 0.02).to(
                    torch.bfloat16
                )
                scale = torch.full((c, members * width), 2.0)
                bts = [
                    (torch.randn(c, width, out, generator=generator) * 0.02).to(torch.bfloat16)
                    for out in outs
                ]
                stacks.append((a, scale, bts))
                table.append(
                    [width, c, a.data_ptr(), scale.data_ptr()] + [b.data_ptr() for b in bts]
                )
                for w, index in used:
                    if w != width:
                        continue
                    for t in (a, scale, *bts):
                        part = t[index]
                        nbytes = part.numel() * part.element_size()
                        regions.append((part.data_ptr(), nbytes))
                        weight_bytes += nbytes
            ys = [torch.zeros(rows, out, dtype=torch.bfloat16) for out in outs]
            groups.append(
                Group(
                    in_features=in_features,
                    outs=outs,
                    plan=torch.tensor(table, dtype=torch.int64),
                    outs_t=torch.tensor(outs, dtype=torch.int64),
                    stacks=stacks,
                    x=torch.randn(rows, in_features, generator=generator).to(torch.bfloat16),
                    ys=ys,
                    ys_ptrs=(ctypes.c_int64 * members)(*[y.data_ptr() for y in ys]),
                    route=route.clone(),
                    addresses=torch.tensor([a for a, _ in regions], dtype=torch.int64),
                    sizes=torch.tensor([b for _, b in regions], dtype=torch.int64),
                    weight_bytes=weight_bytes,
                )
            )
    return groups


class Kernel:
    """A kernel source built as the server builds it, and its call on a Group."""

    def __init__(self, source: Path) -> None:
        from loramux.server.lora.backend.native import NativeKernel
        from loramux.server.native_build import build_library

        self.label = "this checkout" if source == DEFAULT_SOURCE else str(source)
        self.native = NativeKernel(build_library(source))

    def step(self, groups: list[Group]) -> None:
        for g in groups:
            self(g)  # as the engine calls it: into the layers' outputs

    def __call__(self, g: Group) -> None:
        self.native.bgmv(
            g.x.shape[0],
            g.in_features,
            len(g.outs),
            g.outs_t.data_ptr(),
            g.x.data_ptr(),
            g.plan.shape[0],
            g.plan.data_ptr(),
            g.route.data_ptr(),
            g.ys_ptrs,
        )


class PlainRead:
    """`plain_read.cpp`: the same bytes in the same 120 calls (or, `one_pass`, in one call
    over all of a step's regions), nothing else."""

    def __init__(self, one_pass: bool) -> None:
        from loramux.server.native_build import build_library

        path = build_library(Path(__file__).with_name("plain_read.cpp"))
        self._read = ctypes.PyDLL(str(path)).loramux_plain_read
        self._read.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        self._read.restype = ctypes.c_double
        self.one_pass = one_pass
        self.label = "plain read, one pass" if one_pass else "plain read, same calls"
        self._joined: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sink = 0.0

    def step(self, groups: list[Group]) -> None:
        if not self.one_pass:
            for g in groups:
                self.sink += self._read(
                    g.addresses.shape[0], g.addresses.data_ptr(), g.sizes.data_ptr()
                )
            return
        key = id(groups)
        if key not in self._joined:
            self._joined[key] = (
                torch.cat([g.addresses for g in groups]),
                torch.cat([g.sizes for g in groups]),
            )
        addresses, sizes = self._joined[key]
        self.sink += self._read(addresses.shape[0], addresses.data_ptr(), sizes.data_ptr())


def check(kernel: Kernel, groups: list[Group]) -> float:
    """Largest |kernel - float32 reference| / largest |reference| over the first 4 groups."""
    worst = 0.0
    for g in groups[: len(GROUPS)]:
        for y in g.ys:
            y.zero_()  # the kernel adds into its outputs
        kernel(g)
        width_index = {int(row[0]): k for k, row in enumerate(g.plan)}
        for t in range(g.x.shape[0]):
            width, index = (int(v) for v in g.route[t])
            a, scale, bts = g.stacks[width_index[width]]
            h = (a[index].float() @ g.x[t].float()) * scale[index]
            for m in range(len(g.outs)):
                ref = h[m * width : (m + 1) * width] @ bts[m][index].float()
                got = g.ys[m][t].float()
                worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst


def run_step(reader: Any, groups: list[Group], flush: torch.Tensor) -> float:
    flush.sum()  # evict the caches, untimed
    start = time.perf_counter()
    reader.step(groups)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--source",
        action="append",
        type=Path,
        help="kernel source(s) to compare (default: this checkout's bgmv_avx512.cpp)",
    )
    parser.add_argument(
        "--layers", type=int, default=LAYERS, help=f"decoder layers (SmolLM2: {LAYERS})"
    )
    parser.add_argument("--steps", type=int, default=15, help="timed steps per repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, sources alternating")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-read reference")
    parser.add_argument(
        "--check", action="store_true", help="compare each kernel with a float32 reference"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    threads = set_threads()
    info = machine_info()
    print_machine(info)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    kernels: list[Any] = [Kernel(s) for s in (args.source or [DEFAULT_SOURCE])]
    if not args.no_plain:
        kernels += [PlainRead(one_pass=False), PlainRead(one_pass=True)]
    flush = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32)
    data = {c: build_groups(*CONFIGS[c], seed=i, layers=args.layers) for i, c in enumerate(configs)}
    checks = []
    if args.check:
        for kernel in kernels[: len(args.source or [DEFAULT_SOURCE])]:
            for c in configs:
                error = check(kernel, data[c])
                checks.append({"config": c, "kernel": kernel.label, "max_rel_error": error})
                print(f"# check {kernel.label} {c}: max rel error {error:.2e}")
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        order = kernels if rep % 2 == 0 else kernels[::-1]
        for c in configs:
            for kernel in order:
                run_step(kernel, data[c], flush)  # warm-up: first touch, thread team
                for _ in range(args.steps):
                    times.setdefault((c, kernel.label), []).append(run_step(kernel, data[c], flush))
    rows = []
    calls = args.layers * len(GROUPS)
    print(f"\n{threads} threads, {args.reps} x {args.steps} steps of {calls} calls")
    print("| config | kernel | MB per step | step ms p50 | step ms min | GB/s (p50) |")
    print("|---|---|---|---|---|---|")
    for c in configs:
        nbytes = sum(g.weight_bytes for g in data[c])
        for kernel in kernels:
            samples = times[(c, kernel.label)]
            p50 = median(samples)
            row = {
                "config": c,
                "kernel": kernel.label,
                "weight_mb": nbytes / 1e6,
                "step_ms_p50": p50 * 1e3,
                "step_ms_min": min(samples) * 1e3,
                "gb_per_s": nbytes / p50 / 1e9,
            }
            rows.append(row)
            print(
                f"| {c} | {row['kernel']} | {row['weight_mb']:.1f} | {row['step_ms_p50']:.2f} "
                f"| {row['step_ms_min']:.2f} | {row['gb_per_s']:.1f} |",
                flush=True,
            )
    payload = {"machine": info, "args": vars(args), "results": rows, "checks": checks}
    write_json("lora_kernel", payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
