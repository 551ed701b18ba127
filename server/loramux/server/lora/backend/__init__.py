"""LoRA backends, one per platform, chosen once at start."""

from __future__ import annotations

import torch

from loramux.server.lora.backend.base import LoraBackend, bgmv_group, segmented_group
from loramux.server.lora.backend.cpu import CpuBackend
from loramux.server.lora.backend.cuda import CudaBackend

KERNEL_MODES = ("auto", "compiled", "eager")


def make_backend(device: torch.device, kernel: str = "auto") -> LoraBackend:
    """The backend for `device`; `kernel` "eager" runs the decode kernel uncompiled."""
    if kernel not in KERNEL_MODES:
        raise ValueError(f"unknown LoRA kernel {kernel!r}: one of {', '.join(KERNEL_MODES)}")
    mode = "compiled" if kernel == "auto" else kernel
    backend_type: type[LoraBackend] = CudaBackend if device.type == "cuda" else CpuBackend
    return backend_type(mode)


__all__ = [
    "CpuBackend",
    "CudaBackend",
    "LoraBackend",
    "bgmv_group",
    "make_backend",
    "segmented_group",
]
