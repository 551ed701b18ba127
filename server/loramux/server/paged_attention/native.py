"""The hand-written AVX-512 BF16 paged-attention kernel (`paged_attention_avx512.cpp`).

Built, cached and bound (ctypes, the GIL kept for the call) by `loramux.server.native_build`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from loramux.server.kv_cache import KernelBatch
from loramux.server.native_build import BUILD_TIMEOUT_S, KernelLoader, entry_point

SOURCE = Path(__file__).with_name("paged_attention_avx512.cpp")
MAX_HEAD_DIM = 256  # the kernel's limits (kMaxHeadDim, kMaxBlock, kMaxRows)
MAX_BLOCK_SIZE = 64
MAX_QUERY_GROUPS = 64
SOFTMAX_BLOCK = 512  # keys per softmax block (kSplit), as SDPA's CPU kernel takes them


class PagedAttentionKernel:
    """The loaded library's entry point, typed."""

    name = "native"

    def __init__(self, path: Path) -> None:
        self.path = path
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._attend = entry_point(
            path,
            "loramux_paged_attention",
            [i64, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ptr],
        )

    def attend(
        self,
        query: torch.Tensor,  # [tokens, heads, head_dim] bf16, head_dim contiguous
        keys: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim] bf16, contiguous
        values: torch.Tensor,  # same
        batch: KernelBatch,
        scale: float,
        out: torch.Tensor,  # [tokens, heads, head_dim] bf16, contiguous: the batch's rows set
        window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        if window is not None or softcap is not None:  # choose_kernel does not pick it then
            raise ValueError("the native paged-attention kernel computes plain causal attention")
        kv_heads, num_blocks, block_size, head_dim = keys.shape
        heads = query.shape[1]
        assert query.dtype == keys.dtype == values.dtype == out.dtype == torch.bfloat16
        assert query.stride(2) == 1 and keys.is_contiguous() and values.is_contiguous()
        assert out.is_contiguous() and out.shape == query.shape
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
            out.data_ptr(),
        )
        if status != 0:
            raise RuntimeError(f"paged-attention kernel refused its arguments (status {status})")


_LOADER = KernelLoader(SOURCE, PagedAttentionKernel)


def load_kernel(timeout: float = BUILD_TIMEOUT_S) -> PagedAttentionKernel:
    """The kernel, built on first use in this process (cached on disk across them)."""
    return _LOADER.load(timeout)
