"""The base model's NF4 matmul: bitsandbytes' own, or the native CPU kernel, chosen once at start.

bitsandbytes loads and quantises the model on every platform and computes it on CUDA. On
the CPU its 4-bit layer dequantises the whole weight to bf16 on every call and then runs a
bf16 GEMM: a batch-1 decode step of SmolLM2-135M took about as long as a batch-32 one,
nearly all of it dequantising (docs/performance.md, "NF4 kernel"). The native kernel
(`nf4_avx2.cpp`) reads the same packed codes and double-quantised scales in place and
decodes them in registers, to the same bf16 values bit for bit.

`use_nf4_kernel` applies the choice to a loaded model:

* auto: the native kernel on a CPU with AVX2 + FMA and a C++ compiler when every 4-bit
  layer of the model is a layout it reads (nf4, blocksize a multiple of 64 dividing the
  rows, bf16 compute); otherwise bitsandbytes, with the reason logged;
* native: the same, or a start-up error naming why it cannot run here;
* bnb: bitsandbytes' own layers, always.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from loramux.server.native_build import NativeKernelUnavailable, choose_native
from loramux.server.nf4.native import NativeNf4Linear, Nf4Kernel, load_kernel, unsupported

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "native", "bnb")


def four_bit_layers(model: Any) -> list[tuple[str, Any]]:
    """The model's bitsandbytes 4-bit linear layers, by name."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]


def choose_kernel(mode: str, device: torch.device, model: Any) -> Nf4Kernel | None:
    """The native kernel for this model and machine, or None (bitsandbytes computes)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown NF4 kernel {mode!r}: one of {', '.join(KERNEL_MODES)}")
    if mode == "bnb":
        return None

    def load() -> Nf4Kernel:
        if device.type != "cpu":
            raise NativeKernelUnavailable(f"it runs on the CPU, not {device.type}")
        layers = four_bit_layers(model)
        if not layers:
            raise NativeKernelUnavailable("the model has no 4-bit layers")
        for name, layer in layers:
            reason = unsupported(layer)
            if reason is not None:
                raise NativeKernelUnavailable(f"{name} has {reason}")
        return load_kernel()

    return choose_native(mode, "--nf4-kernel", "NF4 matmul: bitsandbytes", load)


def use_nf4_kernel(model: Any, mode: str, device: torch.device) -> bool:
    """Replace every 4-bit layer by a `NativeNf4Linear` when the kernel is chosen; True if so.

    Called once, at start, before the LoRA wrappers take the base layers.
    """
    kernel = choose_kernel(mode, device, model)
    if kernel is None:
        return False
    layers = four_bit_layers(model)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NativeNf4Linear(layer, kernel))
    log.info("NF4 matmul: native kernel (%s) for %d layers", kernel.path.name, len(layers))
    return True


__all__ = ["KERNEL_MODES", "NativeNf4Linear", "choose_kernel", "four_bit_layers", "use_nf4_kernel"]
