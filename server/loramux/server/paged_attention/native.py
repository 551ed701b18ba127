"""The hand-written CPU paged-attention kernel (`paged_attention_cpu.cpp`), in one of its two
builds, chosen once at start by the CPU: AVX-512 BF16 where the CPU has it, else AVX2 + FMA
(the same source; bf16 dot products by widening to float32).

Built, cached and bound (ctypes, the GIL kept for the call) by `loramux.server.native_build`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch

from loramux.server.kv_cache import KernelBatch
from loramux.server.native_build import (
    AVX2_FMA_CPU_FLAGS,
    AVX2_FMA_FLAGS,
    AVX512_BF16_CPU_FLAGS,
    AVX512_BF16_FLAGS,
    BUILD_TIMEOUT_S,
    KernelLoader,
    NativeKernelUnavailable,
    cpu_lacks,
    entry_point,
)

SOURCE = Path(__file__).with_name("paged_attention_cpu.cpp")
MAX_HEAD_DIM = 256  # the kernel's limits (kMaxHeadDim, kMaxBlock, kMaxRows)
MAX_BLOCK_SIZE = 64
MAX_QUERY_GROUPS = 64
SOFTMAX_BLOCK = 512  # keys per softmax block (kSplit), as SDPA's CPU kernel takes them


class PagedAttentionKernel:
    """The loaded library's entry point, typed."""

    name = "native"

    def __init__(self, path: Path, isa: str) -> None:
        self.path = path
        self.isa = isa  # "avx512_bf16" or "avx2"
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self._attend = entry_point(
            path,
            "loramux_paged_attention",
            [i64, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, f32, i64, f32, ptr],
        )

    def attend(
        self,
        query: torch.Tensor,  # [tokens, heads, head_dim] bf16, head_dim contiguous
        keys: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim] bf16, contiguous
        values: torch.Tensor,  # same
        batch: KernelBatch,
        scale: float,
        out: torch.Tensor,  # [tokens, heads, head_dim] bf16, contiguous: the batch's rows set
        window: int | None = None,  # keys at positions > the query's - window
        softcap: float | None = None,  # scores = softcap * tanh(scores / softcap)
    ) -> None:
        kv_heads, num_blocks, block_size, head_dim = keys.shape
        heads = query.shape[1]
        assert query.dtype == keys.dtype == values.dtype == out.dtype == torch.bfloat16
        assert query.stride(2) == 1 and keys.is_contiguous() and values.is_contiguous()
        assert out.is_contiguous() and out.shape == query.shape
        if (window is not None and window < 1) or (softcap is not None and softcap <= 0):
            raise ValueError(f"window {window} and soft-cap {softcap} must be positive")
        status = self._attend(
            batch.sequences.shape[0],
            batch.sequences.data_ptr(),
            batch.tables.data_ptr(),
            query.data_ptr(),
            query.stride(0),
            query.stride(1),
            keys.data_ptr(),
            values.data_ptr(),
            kv_heads,
            heads // kv_heads,
            head_dim,
            block_size,
            num_blocks,
            scale,
            window or 0,
            softcap or 0.0,
            out.data_ptr(),
        )
        if status != 0:
            raise RuntimeError(f"paged-attention kernel refused its arguments (status {status})")


# The two builds of the one source: the first whose instructions this CPU has is loaded.
BUILDS = {
    "avx512_bf16": (AVX512_BF16_FLAGS, AVX512_BF16_CPU_FLAGS),
    "avx2": (AVX2_FMA_FLAGS, AVX2_FMA_CPU_FLAGS),
}


def _wrapper(isa: str) -> Callable[[Path], PagedAttentionKernel]:
    def wrap(path: Path) -> PagedAttentionKernel:
        return PagedAttentionKernel(path, isa)

    return wrap


_LOADERS = {isa: KernelLoader(SOURCE, _wrapper(isa), *build) for isa, build in BUILDS.items()}


def cpu_isa() -> str:
    """The build this CPU runs (NativeKernelUnavailable naming what it lacks if none)."""
    lacking = []
    for isa, (_, cpu_flags) in BUILDS.items():
        missing = cpu_lacks(cpu_flags)
        if missing is None:
            return isa
        lacking.append(missing)
    raise NativeKernelUnavailable("; ".join(lacking))


def load_kernel(timeout: float = BUILD_TIMEOUT_S, isa: str | None = None) -> PagedAttentionKernel:
    """The kernel for this CPU (or the `isa` build), built on first use in this process
    (cached on disk across them)."""
    return _LOADERS[isa or cpu_isa()].load(timeout)
