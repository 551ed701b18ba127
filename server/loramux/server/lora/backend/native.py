"""The hand-written AVX-512 BF16 decode kernel (`bgmv_avx512.cpp`): load and call.

Built and cached by `loramux.server.native_build` (a plain shared library, no torch
headers: a build takes ~3 s instead of the ~1 min of a torch extension) and called through
ctypes. `PyDLL` keeps the GIL for the ~20 us of a call, as torch's own ops do: releasing
it would let a gRPC thread take it and make the engine thread wait out the interpreter's
switch interval.

`load_kernel()` answers a `NativeKernel`, or raises `NativeKernelUnavailable` with the
reason (CPU without AVX-512 BF16, no compiler, a failed or timed-out build);
`make_backend` turns that into a start-up error naming it (`--lora-kernel native`).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from loramux.server.native_build import (
    BUILD_TIMEOUT_S,
    KernelLoader,
    NativeKernelUnavailable,
    cpu_lacks,
    entry_point,
)

SOURCE = Path(__file__).with_name("bgmv_avx512.cpp")
MAX_MEMBERS = 8  # the kernel's limit on projections per fused group


class NativeKernel:
    """The loaded library's entry point, typed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._bgmv = entry_point(
            path, "loramux_bgmv", [i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr]
        )

    def bgmv(
        self,
        rows: int,
        in_features: int,
        members: int,
        outs_ptr: int,
        x_ptr: int,
        classes: int,
        plan_ptr: int,
        route_ptr: int,
        ys: ctypes.Array[ctypes.c_int64],
    ) -> None:
        """Shrink + expand of `rows` rows (layouts in bgmv_avx512.cpp); raises on a bad plan.

        `ys`: each member's output rows, to which its deltas are added (in bf16).
        """
        status = self._bgmv(
            rows,
            in_features,
            members,
            outs_ptr,
            x_ptr,
            classes,
            plan_ptr,
            route_ptr,
            ys,
        )
        if status != 0:
            raise RuntimeError(f"native LoRA kernel refused its arguments (status {status})")


def cpu_supports_kernel() -> str | None:
    """None when this CPU has every instruction set the kernel uses, else what it lacks."""
    return cpu_lacks()


_LOADER = KernelLoader(SOURCE, NativeKernel)


def load_kernel(timeout: float = BUILD_TIMEOUT_S) -> NativeKernel:
    """The kernel, built on first use in this process (cached on disk across them)."""
    return _LOADER.load(timeout)


__all__ = [
    "MAX_MEMBERS",
    "NativeKernel",
    "NativeKernelUnavailable",
    "cpu_supports_kernel",
    "load_kernel",
]
