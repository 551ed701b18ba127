"""Paged attention kernels: one chosen once at start, or none (torch's SDPA over gathers).

`choose_kernel` answers the kernel the runner hands its passes, or None for the torch path
(attention.py: each row's blocks gathered out of the pool, then SDPA or two GEMMs):

* auto: the native kernel on a CPU with AVX-512 BF16 and a C++ compiler, when the model's
  attention is plain causal softmax attention it implements (head size a multiple of 32 up
  to 256, no sliding window, no logit soft-capping, bf16); otherwise torch, with the
  reason logged;
* native: the same, or a start-up error naming why it cannot run here;
* triton: the Triton kernel (triton_ops.py) on any device (through Triton's interpreter on
  the CPU: slow, for tests and dry runs), for any head size, block size and GQA ratio of
  plain causal softmax attention; auto takes it on CUDA where Triton is installed;
* torch: always the torch path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from loramux.server.kv_cache import PoolAttention
from loramux.server.native_build import NativeKernelUnavailable, choose_native
from loramux.server.paged_attention.native import (
    MAX_BLOCK_SIZE,
    MAX_HEAD_DIM,
    MAX_QUERY_GROUPS,
    SOFTMAX_BLOCK,
    PagedAttentionKernel,
    load_kernel,
)
from loramux.server.triton_runtime import TritonUnavailable, prepare

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "native", "triton", "torch")


def unsupported_attention(config: Any, kv_heads: int) -> str | None:
    """Why this model's attention is not the plain causal softmax attention the paged
    kernels compute, or None."""
    if config.num_attention_heads % kv_heads:
        return f"{config.num_attention_heads} query heads over {kv_heads} KV heads"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    for field in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, field, None):
            return f"attention logit soft-capping ({field})"
    return None


def unsupported(config: Any, head_dim: int, kv_heads: int, block_size: int) -> str | None:
    """Why the native kernel cannot compute this model's attention exactly, or None."""
    heads = config.num_attention_heads
    if head_dim % 32 or head_dim > MAX_HEAD_DIM:
        return f"head size {head_dim} (the kernel takes multiples of 32 up to {MAX_HEAD_DIM})"
    if block_size > MAX_BLOCK_SIZE or SOFTMAX_BLOCK % block_size:
        limit = f"divisors of {SOFTMAX_BLOCK} up to {MAX_BLOCK_SIZE}"
        return f"KV block size {block_size} (the kernel takes {limit})"
    if heads % kv_heads or heads // kv_heads > MAX_QUERY_GROUPS:
        return f"{heads} query heads over {kv_heads} KV heads"
    return unsupported_attention(config, kv_heads)


def choose_kernel(
    mode: str,
    device: torch.device,
    config: Any,
    head_dim: int,
    kv_heads: int,
    block_size: int,
) -> PoolAttention | None:
    """The paged-attention kernel for this model and machine (None: the torch path)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown attention kernel {mode!r}: one of {', '.join(KERNEL_MODES)}")
    if mode == "torch":
        return None
    if mode == "triton" or (mode == "auto" and device.type == "cuda"):
        try:
            return _triton_kernel(device, config, kv_heads)
        except TritonUnavailable as exc:
            if mode == "triton":
                raise ValueError(f"--attention-kernel triton is not available here: {exc}") from exc
            log.info("paged attention: torch (SDPA over gathered blocks): %s", exc)
            return None

    def load() -> PagedAttentionKernel:
        if device.type != "cpu":
            raise NativeKernelUnavailable(f"it runs on the CPU, not {device.type}")
        reason = unsupported(config, head_dim, kv_heads, block_size)
        if reason is not None:
            raise NativeKernelUnavailable(f"this model has {reason}")
        return load_kernel()

    return choose_native(
        mode, "--attention-kernel", "paged attention: torch (SDPA over gathered blocks)", load
    )


def _triton_kernel(device: torch.device, config: Any, kv_heads: int) -> PoolAttention:
    reason = unsupported_attention(config, kv_heads)
    if reason is not None:
        raise TritonUnavailable(f"this model has {reason}")
    prepare(device)
    from loramux.server.paged_attention.triton_ops import TritonPagedAttention

    return TritonPagedAttention()


__all__ = ["KERNEL_MODES", "PagedAttentionKernel", "choose_kernel", "unsupported"]
