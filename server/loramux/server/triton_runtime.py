"""Running Triton kernels on a device: compiled for CUDA, or through its interpreter on the CPU.

Triton decides at decoration time whether a `@triton.jit` function is compiled or
interpreted: `triton.jit` reads `TRITON_INTERPRET` (through `triton.knobs`, at each
decoration), and triton.language's own helpers (`tl.sum`, `tl.zeros`, ...) are decorated
when triton is first imported. So the variable must be set before triton's first import,
and torch._dynamo imports triton (transformers imports dynamo): in practice at process
start. `configure_process` does that for `loramux serve` (and the benchmarks) when a
Triton kernel is asked for on a machine without CUDA; the tests' conftest does it too.
`prepare(device)` checks the process is in the state the device needs before the kernel
modules are imported, and otherwise raises TritonUnavailable saying what to do: a CPU
engine runs the kernels through the interpreter (numpy per program: correct and slow,
for tests and `bench/gpu.sh --dry-run`), a CUDA one compiled.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

INTERPRET_ENV = "TRITON_INTERPRET"


class TritonUnavailable(RuntimeError):
    """Triton cannot run this device's kernels in this process; the message says why."""


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def configure_process(lora_kernel: str, attention_kernel: str, device: str) -> None:
    """Before anything imports triton: turn the interpreter on when a Triton kernel is
    asked for (`--lora-kernel triton`, `--attention-kernel triton`) and the device is the
    CPU (`device`: the --device setting, auto meaning CUDA when present)."""
    if "triton" not in (lora_kernel, attention_kernel):
        return
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu:
        os.environ.setdefault(INTERPRET_ENV, "1")


def _interpreting() -> bool:
    """Whether triton.language's helpers were decorated for the interpreter."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def prepare(device: torch.device) -> None:
    """Check (or, before triton's first import, make) this process able to run Triton
    kernels on `device`: interpreted on the CPU, compiled on CUDA. Call it before
    importing a module that holds kernels; raises TritonUnavailable saying why not."""
    if not triton_installed():
        raise TritonUnavailable("the triton package is not installed (pip install triton)")
    if device.type not in ("cpu", "cuda"):
        raise TritonUnavailable(
            f"Triton kernels run on CUDA or, interpreted, on the CPU: not {device}"
        )
    if device.type == "cpu" and "triton" not in sys.modules:
        os.environ[INTERPRET_ENV] = "1"
    interpreting = _interpreting()
    if device.type == "cpu" and not interpreting:
        raise TritonUnavailable(
            f"triton was imported in this process before {INTERPRET_ENV}=1 was set, so its "
            f"kernels cannot run on the CPU: start the process with {INTERPRET_ENV}=1 "
            "(loramux serve does so when a Triton kernel is asked for without CUDA)"
        )
    if device.type == "cuda" and interpreting:
        raise TritonUnavailable(
            f"{INTERPRET_ENV} is set: this process interprets Triton kernels on the CPU and "
            "cannot compile them for CUDA"
        )
