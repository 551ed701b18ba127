"""The hand-written NF4 matmul (`nf4_avx2.cpp`): load, call, and the layer that uses it.

Built, cached and bound (ctypes, the GIL kept for the call) by `loramux.server.native_build`.
`NativeNf4Linear` takes over a bitsandbytes `Linear4bit`'s own parameters (the packed codes
and their quantisation state, the bias) and runs its forward through the kernel, reading
them in place: no copy, no other layout, the memory footprint unchanged.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramux.server.native_build import (
    AVX2_FMA_CPU_FLAGS,
    AVX2_FMA_FLAGS,
    BUILD_TIMEOUT_S,
    KernelLoader,
    entry_point,
)

SOURCE = Path(__file__).with_name("nf4_avx2.cpp")
CHUNK = 64  # elements per decoded chunk: blocksizes and in_features are multiples of it


class Nf4Kernel:
    """The loaded library's entry points, typed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self.matmul = entry_point(
            path,
            "loramux_nf4_matmul",
            [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, f32, ptr, i64, i64, ptr, ptr, i64],
        )
        self._dequantize = entry_point(
            path, "loramux_nf4_dequantize", [i64, i64, ptr, ptr, ptr, ptr, f32, ptr, i64, i64, ptr]
        )

    def dequantize(self, weight: Any) -> torch.Tensor:  # [out, in] bf16
        """A `Params4bit`'s weights as the matmul decodes them (tests compare them with
        bitsandbytes' `dequantize_4bit`, bit for bit)."""
        layout = QuantLayout(weight)
        out = torch.empty(layout.out_features, layout.in_features, dtype=torch.bfloat16)
        status = self._dequantize(
            layout.in_features, layout.out_features, *layout.args, out.data_ptr()
        )
        if status != 0:
            raise RuntimeError(f"NF4 kernel refused its arguments (status {status})")
        return out


class QuantLayout:
    """A Params4bit's storage as the kernel's arguments (pointers into bitsandbytes' own
    tensors, which the weight keeps alive)."""

    def __init__(self, weight: Any) -> None:
        state = weight.quant_state
        self.out_features, self.in_features = (int(n) for n in state.shape)
        self.code = state.code  # [16] float32: the NF4 codebook
        if state.nested:
            absmax_q, absmax = state.absmax.data_ptr(), state.state2.absmax.data_ptr()
            code2, offset, blocksize2 = (
                state.state2.code.data_ptr(),
                float(state.offset),
                int(state.state2.blocksize),
            )
        else:
            absmax_q, absmax, code2, offset, blocksize2 = 0, state.absmax.data_ptr(), 0, 0.0, 0
        # (packed, absmax_q, absmax, code2, offset, nf4, blocksize, blocksize2)
        self.args = (
            weight.data_ptr(),
            absmax_q,
            absmax,
            code2,
            offset,
            self.code.data_ptr(),
            int(state.blocksize),
            blocksize2,
        )


def unsupported(layer: Any) -> str | None:
    """Why the kernel cannot compute this `Linear4bit` exactly as bitsandbytes does, or None."""
    if layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook"):
        return "hooks on the layer (the native layer that replaces it would not run them)"
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "a 4-bit layer without its quantisation state"
    if state.quant_type != "nf4":
        return f"quant type {state.quant_type} (the kernel reads nf4)"
    if getattr(state, "packing_format_for_cpu", False):
        return "weights already repacked for bitsandbytes' own CPU kernel"
    if weight.dtype != torch.uint8 or weight.device.type != "cpu" or not weight.is_contiguous():
        return f"codes stored as {weight.dtype} on {weight.device} (the kernel reads uint8, CPU)"
    out_features, in_features = (int(n) for n in state.shape)
    if (out_features, in_features) != (layer.out_features, layer.in_features):
        shape = f"{layer.in_features} -> {layer.out_features}"
        return f"a weight quantised as {list(state.shape)} for a {shape} layer"
    blocksize = int(state.blocksize)
    if blocksize % CHUNK or in_features % blocksize:
        return f"blocksize {blocksize} over {in_features} inputs (multiples of {CHUNK}, whole rows)"
    if layer.compute_dtype not in (None, torch.bfloat16):
        return f"compute dtype {layer.compute_dtype} (the kernel computes bf16 layers)"
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
        if state.absmax.dtype != torch.uint8 or state.state2.absmax.dtype != torch.float32:
            return "double-quantised scales not stored as uint8 codes and float32"
    elif state.absmax.dtype != torch.float32:
        return f"scales stored as {state.absmax.dtype} (float32 expected)"
    if any(not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        return "quantisation state not contiguous on the CPU"
    bias = layer.bias
    if bias is not None and bias.dtype != torch.bfloat16:
        return f"a {bias.dtype} bias (the kernel adds a bf16 one)"
    return None


class NativeNf4Linear(nn.Module):
    """A bitsandbytes NF4 `Linear4bit` computed by the native kernel (inference only).

    Owns the bnb layer's `weight` (Params4bit: codes + quant_state) and `bias` under the
    same names, so state dicts, parameter counts and the memory footprint stay as they were.
    """

    def __init__(self, layer: Any, kernel: Nf4Kernel) -> None:
        super().__init__()
        self.in_features = int(layer.in_features)
        self.out_features = int(layer.out_features)
        self.weight = layer.weight  # Params4bit [out * in / 2, 1] uint8
        self.bias = layer.bias  # [out] bf16 or None
        self.kernel = kernel
        self._layout = QuantLayout(self.weight)
        self._bias_ptr = self.bias.data_ptr() if self.bias is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        """One token per row (decode, [rows, 1, in] or [rows, in]): the kernel's matmul.
        Prompt tokens ([rows, T > 1, in], a prefill or mixed pass): the kernel's weights,
        bitsandbytes' bits, then torch's bf16 GEMM on the same shapes, which is how
        bitsandbytes computes the layer and so PEFT's numbers bit for bit. The engine's
        prompt passes depend on that: they compute the LoRA deltas of prompt chunks as PEFT
        does (LoraBackend.prompt_chunk), and with the kernel's own float32 sums there,
        tests/test_engine.py saw two of four requests part from PEFT at near-ties (one at
        its first token) where it allows one."""
        if x.dim() > 2 and x.shape[-2] > 1:
            return self._as_bitsandbytes(x)
        dtype = x.dtype
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.bfloat16 or flat.stride(-1) != 1:
            flat = flat.to(torch.bfloat16).contiguous()
        rows = flat.shape[0]
        y = torch.empty(rows, self.out_features, dtype=torch.bfloat16, device=x.device)
        status = self.kernel.matmul(
            rows,
            self.in_features,
            self.out_features,
            flat.data_ptr(),
            flat.stride(0),
            *self._layout.args,
            self._bias_ptr,
            y.data_ptr(),
            self.out_features,
        )
        if status != 0:
            raise RuntimeError(f"NF4 kernel refused its arguments (status {status})")
        y = y.view(*x.shape[:-1], self.out_features)
        return y if dtype == torch.bfloat16 else y.to(dtype)

    def _as_bitsandbytes(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.kernel.dequantize(self.weight)  # [out, in] bf16
        bias = self.bias.to(torch.bfloat16) if self.bias is not None else None
        y = torch.nn.functional.linear(x.to(torch.bfloat16), weights, bias)
        return y.to(x.dtype)

    # Called straight, without nn.Module's hook dispatch (~0.7 us a call, 210 calls a step
    # on SmolLM2), as MultiLoraLinear is: the layers it replaces had no hooks (`unsupported`).
    __call__ = forward

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, native NF4"


_LOADER = KernelLoader(SOURCE, Nf4Kernel, AVX2_FMA_FLAGS, AVX2_FMA_CPU_FLAGS)


def load_kernel(timeout: float = BUILD_TIMEOUT_S) -> Nf4Kernel:
    """The kernel, built on first use in this process (cached on disk across them)."""
    return _LOADER.load(timeout)
