"""The training compute dtype (`--compute-dtype`), chosen once at the start of a run.

The 4-bit base layers dequantise their weights and multiply in this dtype
(bitsandbytes' ``bnb_4bit_compute_dtype``); the quantised weights themselves, the LoRA
matrices (fp32, PEFT's default) and the saved adapter do not depend on it. bf16 halves the
activations' memory and is fast where the hardware multiplies bf16 natively (CUDA GPUs with
bf16, CPUs with AVX-512 BF16 or AMX). Elsewhere torch converts every bf16 operand to fp32
and back around an fp32 GEMM: on an AVX2 EPYC a QLoRA step of SmolLM2-135M at batch 8 took
~61 s in bf16 (docs/performance.md, "Train: compute dtype") -- PyTorch's own AMP notes say
to check ``avx512_bf16`` in /proc/cpuinfo before using bf16 on a CPU. ``auto`` therefore
picks bf16 where it is native and float32 otherwise, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

ComputeDtype = Literal["auto", "bfloat16", "float32"]  # what --compute-dtype accepts
ResolvedDtype = Literal["bfloat16", "float32"]  # what a run computes in
COMPUTE_DTYPES: tuple[ComputeDtype, ...] = get_args(ComputeDtype)
# /proc/cpuinfo flags of native bf16 matrix arithmetic on x86 (Cooper Lake / Zen 4 and later,
# Sapphire Rapids' AMX tiles).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class ComputePrecision:
    """The compute dtype a run uses, and why (logged, and written to the card and summary)."""

    dtype: ResolvedDtype
    requested: ComputeDtype
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.dtype, "requested": self.requested, "reason": self.reason}


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo ("flags" lines on x86, "Features" on
    ARM); empty where there is no such file (macOS, Windows): no native bf16 is assumed."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def choose_compute_dtype(
    requested: ComputeDtype, device_type: str, *, cpu_flags: frozenset[str], cuda_bf16: bool
) -> ComputePrecision:
    """`requested` as given, or for ``auto``: bf16 on a CUDA device that supports it and
    on a CPU with one of `BF16_CPU_FLAGS`, float32 otherwise. Pure: the machine's facts are
    arguments (`cpu_flags`, `cuda_bf16`), so every case is testable on any machine."""
    if requested != "auto":
        return ComputePrecision(requested, requested, f"--compute-dtype {requested} was asked for")
    if device_type == "cuda":
        if cuda_bf16:
            return ComputePrecision("bfloat16", requested, "auto: the CUDA device supports bf16")
        return ComputePrecision("float32", requested, "auto: the CUDA device has no bf16")
    native = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags]
    if native:
        return ComputePrecision(
            "bfloat16", requested, f"auto: the CPU multiplies bf16 natively ({', '.join(native)})"
        )
    return ComputePrecision(
        "float32",
        requested,
        f"auto: the CPU has no native bf16 ({' / '.join(BF16_CPU_FLAGS)} not among its flags); "
        "bf16 would be emulated through float32, several times slower",
    )


def compute_precision(requested: ComputeDtype, device: torch.device) -> ComputePrecision:
    """`choose_compute_dtype` on this machine's facts, for `device`."""
    import torch

    cuda_bf16 = bool(
        device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    flags = cpu_flags() if device.type == "cpu" else frozenset()
    return choose_compute_dtype(requested, device.type, cpu_flags=flags, cuda_bf16=cuda_bf16)
