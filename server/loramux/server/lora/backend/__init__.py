"""LoRA backends, one per platform, chosen once at start."""

from __future__ import annotations

import logging

import torch

from loramux.server.lora.backend.base import LoraBackend, bgmv_group, segmented_group
from loramux.server.lora.backend.cpu import CpuBackend
from loramux.server.lora.backend.cpu_native import CpuNativeBackend
from loramux.server.lora.backend.cuda import CudaBackend
from loramux.server.lora.backend.native import NativeKernelUnavailable, load_kernel

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "native", "compiled", "eager")


def make_backend(
    device: torch.device, kernel: str = "auto", slot_dtype: str = "bf16"
) -> LoraBackend:
    """The backend for `device` and the decode kernel `kernel`.

    auto: on the CPU the hand-written AVX-512 BF16 kernel (`native`) where the CPU has it,
    a compiler builds it and the slots are bf16, else (with the reason logged) the
    torch.compile'd one; on CUDA the compiled one. native: that kernel or an error saying
    why not. compiled / eager: the gather-reduce kernel compiled or not.
    """
    if kernel not in KERNEL_MODES:
        raise ValueError(f"unknown LoRA kernel {kernel!r}: one of {', '.join(KERNEL_MODES)}")
    if device.type == "cuda":
        if kernel == "native":
            raise ValueError("the native LoRA kernel runs on the CPU: on CUDA use auto or compiled")
        return CudaBackend("compiled" if kernel == "auto" else kernel)
    if kernel in ("auto", "native"):
        try:
            if slot_dtype != "bf16":
                raise NativeKernelUnavailable(f"it reads bf16 slots, not {slot_dtype}")
            return CpuNativeBackend(load_kernel())
        except NativeKernelUnavailable as exc:
            if kernel == "native":
                raise ValueError(f"--lora-kernel native is not available here: {exc}") from exc
            log.warning("native LoRA kernel not used (%s): the compiled kernel runs instead", exc)
        kernel = "compiled"
    return CpuBackend(kernel)


__all__ = [
    "KERNEL_MODES",
    "CpuBackend",
    "CpuNativeBackend",
    "CudaBackend",
    "LoraBackend",
    "bgmv_group",
    "make_backend",
    "segmented_group",
]
