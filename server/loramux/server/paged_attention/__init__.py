"""Paged attention kernels: one chosen once at start, or none (torch's SDPA over gathers).

`choose_kernel` answers the kernel the runner hands its passes, or None for the torch path
(attention.py: each row's blocks gathered out of the pool, then SDPA or two GEMMs, which
computes every attention variant the engine serves):

* auto: the native kernel (native.py) on a CPU with AVX-512 BF16 and a C++ compiler, when
  the model's attention is one it implements (head size a multiple of 32 up to 256, bf16,
  causal softmax with per-layer sliding windows and logit soft-capping, no attention
  sinks); otherwise torch, with the reason logged. Its AVX2 + FMA build (the same source)
  is not taken by auto;
* native: the same on a CPU with AVX-512 BF16 or AVX2 + FMA (the build chosen by the CPU),
  or a start-up error naming why it cannot run here;
* triton: the Triton kernel (triton_ops.py) on any device (through Triton's interpreter on
  the CPU: slow, for tests and dry runs), for any head size, block size and GQA ratio of
  causal softmax attention, with per-layer sliding windows and logit soft-capping (Gemma
  2, Mistral, StarCoder2, Gemma 3), not attention sinks (GPT-OSS: a start-up error); auto
  takes it on CUDA where Triton is installed and the model has no sinks, else torch;
* torch: always the torch path.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import torch

from loramux.server.kv_cache import PoolAttention
from loramux.server.model_support import SLIDING_WINDOW, SOFTCAP
from loramux.server.native_build import NativeKernelUnavailable, choose_native
from loramux.server.paged_attention.native import (
    MAX_BLOCK_SIZE,
    MAX_HEAD_DIM,
    MAX_QUERY_GROUPS,
    SOFTMAX_BLOCK,
    PagedAttentionKernel,
    cpu_isa,
    load_kernel,
)
from loramux.server.triton_runtime import TritonUnavailable, prepare

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "native", "triton", "torch")


# The attention variants (model_support's names) each kernel computes besides plain causal
# softmax attention
NATIVE_VARIANTS = frozenset({SLIDING_WINDOW, SOFTCAP})
TRITON_VARIANTS = frozenset({SLIDING_WINDOW, SOFTCAP})
# The native builds `auto` takes (native.BUILDS): the AVX2 one only when asked for, until
# the whole test suite has run through it on an AVX2 machine (docs/performance.md has its
# timings against the torch path)
AUTO_NATIVE_BUILDS = frozenset({"avx512_bf16"})


def config_variants(config: Any) -> set[str]:
    """The attention variants a model's config declares (the engine adds what its probe of
    the model's own forward found: model_support.ModelShape.attention_variants)."""
    variants = set()
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        variants.add(SLIDING_WINDOW)
    for field in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, field, None):
            variants.add(SOFTCAP)
    return variants


def unsupported_attention(
    config: Any, kv_heads: int, variants: Collection[str], computed: Collection[str]
) -> str | None:
    """Why this model's attention is not what a kernel computing causal softmax attention
    and the `computed` variants computes, or None."""
    if config.num_attention_heads % kv_heads:
        return f"{config.num_attention_heads} query heads over {kv_heads} KV heads"
    lacking = sorted((set(variants) | config_variants(config)) - set(computed))
    return ", ".join(lacking) if lacking else None


def unsupported(
    config: Any, head_dim: int, kv_heads: int, block_size: int, variants: Collection[str] = ()
) -> str | None:
    """Why the native kernel cannot compute this model's attention exactly, or None."""
    heads = config.num_attention_heads
    if head_dim % 32 or head_dim > MAX_HEAD_DIM:
        return f"head size {head_dim} (the kernel takes multiples of 32 up to {MAX_HEAD_DIM})"
    if block_size > MAX_BLOCK_SIZE or SOFTMAX_BLOCK % block_size:
        limit = f"divisors of {SOFTMAX_BLOCK} up to {MAX_BLOCK_SIZE}"
        return f"KV block size {block_size} (the kernel takes {limit})"
    if heads % kv_heads or heads // kv_heads > MAX_QUERY_GROUPS:
        return f"{heads} query heads over {kv_heads} KV heads"
    return unsupported_attention(config, kv_heads, variants, NATIVE_VARIANTS)


def choose_kernel(
    mode: str,
    device: torch.device,
    config: Any,
    head_dim: int,
    kv_heads: int,
    block_size: int,
    variants: Collection[str] = (),
) -> PoolAttention | None:
    """The paged-attention kernel for this model and machine (None: the torch path).

    `variants`: the attention variants the model uses beyond plain causal softmax
    attention (model_support's names); a kernel is chosen only if it computes them all."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown attention kernel {mode!r}: one of {', '.join(KERNEL_MODES)}")
    if mode == "torch":
        return None
    if mode == "triton" or (mode == "auto" and device.type == "cuda"):
        try:
            return _triton_kernel(device, config, kv_heads, variants)
        except TritonUnavailable as exc:
            if mode == "triton":
                raise ValueError(f"--attention-kernel triton is not available here: {exc}") from exc
            log.info("paged attention: torch (SDPA over gathered blocks): %s", exc)
            return None

    def load() -> PagedAttentionKernel:
        if device.type != "cpu":
            raise NativeKernelUnavailable(f"it runs on the CPU, not {device.type}")
        reason = unsupported(config, head_dim, kv_heads, block_size, variants)
        if reason is not None:
            raise NativeKernelUnavailable(f"this model has {reason}")
        isa = cpu_isa()
        if mode == "auto" and isa not in AUTO_NATIVE_BUILDS:
            raise NativeKernelUnavailable(
                f"its {isa} build runs only when asked for (--attention-kernel native)"
            )
        return load_kernel(isa=isa)

    return choose_native(
        mode, "--attention-kernel", "paged attention: torch (SDPA over gathered blocks)", load
    )


def _triton_kernel(
    device: torch.device, config: Any, kv_heads: int, variants: Collection[str]
) -> PoolAttention:
    reason = unsupported_attention(config, kv_heads, variants, TRITON_VARIANTS)
    if reason is not None:
        raise TritonUnavailable(f"this model has {reason}")
    prepare(device)
    from loramux.server.paged_attention.triton_ops import TritonPagedAttention

    return TritonPagedAttention()


__all__ = [
    "KERNEL_MODES",
    "NATIVE_VARIANTS",
    "TRITON_VARIANTS",
    "PagedAttentionKernel",
    "choose_kernel",
    "unsupported",
]
