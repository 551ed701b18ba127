"""One layer's decode attention: the torch path against the native paged-attention kernel.

    python -m bench.paged_attention                    # rows 1,8,32 x contexts 256,1024,4096
    python -m bench.paged_attention --rows 32 --contexts 4096 --reps 30

SmolLM2's attention geometry (9 query heads over 3 KV heads, head size 64, 16-token blocks),
decoding rows (one query token each) whose blocks are scattered over the pool. For each
attention variant (plain causal; a 512-token sliding window, as Mistral's; Gemma 2's
window with logit soft-capping 50) both paths run through the engine's own code
(attention.py `paged_attention_forward`): the torch path as the decode pass runs it
without a kernel (each row's blocks gathered out of the pool by `PagedKVCache`, then
transformers' SDPA, or the two GEMMs of the eager attention for soft-capping), the
kernel's straight from the pool (`PoolKV`). Median call times, alternating halves, side
by side in one process, so a busy machine slows both alike. The kernel is the build this
CPU loads (AVX-512 BF16 or AVX2); it is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from bench.common import machine_info, print_machine

KV_HEADS, GROUPS, HEAD_DIM, BLOCK = 3, 3, 64, 16
VARIANTS: dict[str, dict[str, float | int | None]] = {
    "plain": {"sliding_window": None, "softcap": None},
    "window 512": {"sliding_window": 512, "softcap": None},
    "window 512 + softcap 50": {"sliding_window": 512, "softcap": 50.0},
}


def _median_us(call: Callable[[], object], reps: int) -> float:
    call()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _measure(
    cache: Any,
    kernel: Any,
    tables: torch.Tensor,  # [rows, blocks] int64
    context: int,
    kwargs: dict[str, float | int | None],
    reps: int,
    attend: Callable[..., Any],
) -> tuple[float, float]:
    """Median us of one layer's attention for these decoding rows: torch path, kernel."""
    from loramux.server.kv_cache import KernelBatch, PoolKV

    rows, blocks = tables.shape
    module = SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True, training=False)
    scale = HEAD_DIM**-0.5
    query = torch.randn(rows, KV_HEADS * GROUPS, 1, HEAD_DIM).bfloat16()
    length = context + 1
    mask = torch.zeros(rows, 1, 1, length, dtype=torch.bfloat16)
    sequences = torch.tensor([(r, 1, context, r * blocks) for r in range(rows)])
    batch = KernelBatch(sequences, tables.reshape(-1).contiguous(), kernel)
    pooled = PoolKV(cache.keys[0], batch), PoolKV(cache.values[0], batch)

    def torch_path() -> object:
        keys = cache._rows(cache.keys[0], tables, length)
        values = cache._rows(cache.values[0], tables, length)
        return attend(module, query, keys, values, mask, scaling=scale, **kwargs)

    def native_path() -> object:
        return attend(module, query, *pooled, None, scaling=scale, **kwargs)

    torch_us = native_us = 0.0
    for _ in range(2):  # alternating halves
        torch_us += _median_us(torch_path, reps) / 2
        native_us += _median_us(native_path, reps) / 2
    return torch_us, native_us


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,32", help="comma-separated decoding rows")
    parser.add_argument("--contexts", default="256,1024,4096", help="tokens before each row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every CPU)")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args(argv)

    from loramux.server.attention import paged_attention_forward
    from loramux.server.kv_cache import PagedKVCache
    from loramux.server.paged_attention.native import load_kernel
    from loramux.server.threads import available_cpus

    torch.set_num_threads(args.threads or available_cpus())
    print_machine(machine_info())
    kernel = load_kernel()
    print(f"# native kernel build: {kernel.isa}")
    rows_list = [int(r) for r in args.rows.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    blocks_needed = max(rows_list) * -(-(max(contexts) + 1) // BLOCK)
    cache = PagedKVCache(
        1, blocks_needed + 1, BLOCK, KV_HEADS, HEAD_DIM, torch.bfloat16, torch.device("cpu")
    )
    generator = torch.Generator().manual_seed(0)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator) * 1.5)
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    order = torch.randperm(blocks_needed, generator=generator)
    print("| variant | rows | context | torch path us | native us | ratio |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, kwargs in VARIANTS.items():
            for rows in rows_list:
                for context in contexts:
                    blocks = -(-(context + 1) // BLOCK)
                    tables = order[: rows * blocks].reshape(rows, blocks)
                    reps = max(5, args.reps // max(1, rows * context // 16384))
                    torch_us, native_us = _measure(
                        cache, kernel, tables, context, kwargs, reps, paged_attention_forward
                    )
                    print(
                        f"| {name} | {rows} | {context} | {torch_us:.0f} | {native_us:.0f} | "
                        f"{torch_us / native_us:.1f}x |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
