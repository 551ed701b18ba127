"""LoRA backends, one per platform, chosen once at start."""

from __future__ import annotations

import logging

import torch

from loramux.server.lora.backend.base import LoraBackend, bgmv_group, segmented_group
from loramux.server.lora.backend.cpu import CpuBackend
from loramux.server.lora.backend.cpu_native import CpuNativeBackend
from loramux.server.lora.backend.cuda import CudaBackend
from loramux.server.lora.backend.native import NativeKernelUnavailable, load_kernel
from loramux.server.lora.backend.triton_backend import TritonBackend
from loramux.server.triton_runtime import TritonUnavailable

KERNEL_MODES = ("auto", "native", "triton", "compiled", "eager")

log = logging.getLogger(__name__)


def make_backend(
    device: torch.device, kernel: str = "auto", slot_dtype: str = "bf16"
) -> LoraBackend:
    """The backend for `device` and the kernel `kernel`, chosen once at start.

    triton: the explicit Triton SGMV/BGMV kernels (triton_backend.py), compiled on CUDA,
    through Triton's interpreter on the CPU (slow: tests and dry runs); an error naming
    why where Triton cannot run them. compiled: the torch.compile'd gather-reduce with
    dense GEMMs for few adapters (on CUDA, Triton); eager: the same uncompiled. native
    (CPU only): the hand-written AVX-512 BF16 kernel, or an error saying why it cannot
    run here (CPU without the instructions, int8 slots, no compiler, a failed build).
    auto: native where it can run (CPU, bf16 slots, the kernel built), else compiled
    with the reason logged; in the side-by-side engine benchmark (docs/performance.md)
    native was ahead in every configuration after its prompt tokens were computed as PEFT
    computes them (cd10d7d). On CUDA, auto is triton where Triton is installed (else
    compiled, the reason logged): explicit kernels a reader can review and CI checks
    through the interpreter, where torch.compile's are
    generated at run time (not yet measured against each other on a GPU).
    """
    if kernel not in KERNEL_MODES:
        raise ValueError(f"unknown LoRA kernel {kernel!r}: one of {', '.join(KERNEL_MODES)}")
    if kernel == "auto" and device.type == "cpu":
        try:
            if slot_dtype != "bf16":
                raise NativeKernelUnavailable(f"it reads bf16 slots, not {slot_dtype}")
            return CpuNativeBackend(load_kernel())
        except NativeKernelUnavailable as exc:
            log.info("LoRA kernel: compiled (the native kernel cannot run here: %s)", exc)
    if kernel == "triton" or (kernel == "auto" and device.type == "cuda"):
        try:
            return TritonBackend(device)
        except TritonUnavailable as exc:
            if kernel == "triton":
                raise ValueError(f"--lora-kernel triton is not available here: {exc}") from exc
            log.info("LoRA kernel: compiled (Triton cannot run here: %s)", exc)
    if kernel == "native":
        if device.type != "cpu":
            raise ValueError("the native LoRA kernel runs on the CPU: on CUDA use auto or compiled")
        try:
            if slot_dtype != "bf16":
                raise NativeKernelUnavailable(f"it reads bf16 slots, not {slot_dtype}")
            return CpuNativeBackend(load_kernel())
        except NativeKernelUnavailable as exc:
            raise ValueError(f"--lora-kernel native is not available here: {exc}") from exc
    mode = "compiled" if kernel == "auto" else kernel
    backend_type: type[LoraBackend] = CudaBackend if device.type == "cuda" else CpuBackend
    return backend_type(mode)


__all__ = [
    "KERNEL_MODES",
    "CpuBackend",
    "CpuNativeBackend",
    "CudaBackend",
    "LoraBackend",
    "TritonBackend",
    "bgmv_group",
    "make_backend",
    "segmented_group",
]
