"""The CPU tier's memory: where adapters offloaded from device slots live on the host.

On CUDA a host -> device copy is asynchronous only from page-locked ("pinned") memory; from
ordinary pageable memory the driver first stages it through a pinned buffer of its own,
and the copy blocks the host. So on CUDA the adapters of the CPU tier are held in pinned
memory (vLLM does the same for its CPU LoRA cache: its LoRA weights are created with
`pin_memory` where the platform allows it), up to a byte budget: pinned pages cannot be
swapped, and pinning most of a host's memory starves everything else on it. Past the
budget an adapter stays in pageable memory; its device copy is then synchronous, slower
but still correct.

The placement is chosen once at start (`make_host_tier`): `PlainMemory` on the CPU (the
CPU build of torch cannot pin memory, and a CPU device reads host memory directly),
`PinnedMemory` on CUDA. Both go through the same `HostTier` bookkeeping, so the budget
and its arithmetic are tested here without a device (tests/test_host_memory.py); only the
allocation call differs. None of it has run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from loramux.server.adapters import AdapterWeights, TokenRows

if TYPE_CHECKING:
    from loramux.server.adapters import ExpertShape, LinearShape

MEMINFO = Path("/proc/meminfo")
# --pinned-host-bytes 0 (auto): this share of the host memory available at start.
AUTO_PINNED_SHARE = 0.5


class HostMemory(Protocol):
    """How the CPU tier's tensors are allocated."""

    name: str

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as the CPU tier keeps it (the same one, or a copy)."""
        ...


class PlainMemory:
    """Pageable host memory: the tensors as they were read (the CPU device, and past the
    pinned budget on CUDA)."""

    name = "plain"

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class PinnedMemory:
    """Page-locked host memory, so the copies into device slots can be asynchronous (CUDA)."""

    name = "pinned"

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()


def host_adapter_bytes(
    shapes: Iterable[LinearShape], rank: int, experts: Iterable[ExpertShape] = ()
) -> int:
    """Host bytes of one adapter of `rank` on every adaptable layer, as the loader holds
    it: A [rank, in] and B [out, rank] in bf16 per layer, and every expert's A and B per
    fused experts parameter (DoRA's float32 magnitudes and trainable tokens' rows, when an
    adapter has them, come on top)."""
    per_layer = sum(rank * (s.in_features + s.out_features) * 2 for s in shapes)
    return per_layer + sum(
        e.num_experts * rank * (e.in_features + e.out_features) * 2 for e in experts
    )


def pinned_budget(available: int, total: int, setting: int) -> int:
    """The bytes the CPU tier may pin, from the host's (available, total) memory at start
    and --pinned-host-bytes (0: AUTO_PINNED_SHARE of what is available). Raises ValueError
    naming the setting when it asks for more than is available."""
    if not 0 <= available <= total:
        raise ValueError(f"available host memory {available} outside [0, total {total}]")
    if setting < 0:
        raise ValueError(f"--pinned-host-bytes must be >= 0 (0: auto), got {setting}")
    if setting == 0:
        return int(available * AUTO_PINNED_SHARE)
    if setting > available:
        raise ValueError(
            f"--pinned-host-bytes {setting} is more than the {available} bytes of host memory "
            f"available (of {total}): pinned pages cannot be swapped out; lower it or use 0 "
            "(auto: half of what is available)"
        )
    return setting


def adapters_fitting(budget: int, adapter_bytes: int, max_cpu_adapters: int) -> int:
    """How many adapters of `adapter_bytes` each the pinned budget holds, at most the CPU
    tier's --max-cpu-adapters."""
    if adapter_bytes <= 0:
        return max_cpu_adapters
    return min(max_cpu_adapters, budget // adapter_bytes)


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemAvailable, MemTotal) in bytes from /proc/meminfo's text."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in ("MemAvailable", "MemTotal") and parts:
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            values[key] = int(parts[0]) * scale
    if "MemTotal" not in values or "MemAvailable" not in values:
        raise ValueError("no MemTotal and MemAvailable lines in /proc/meminfo")
    return values["MemAvailable"], values["MemTotal"]


def host_memory_figures() -> tuple[int, int]:
    """The host's (available, total) memory in bytes now (Linux)."""
    return parse_meminfo(MEMINFO.read_text())


@dataclass(frozen=True)
class HostTierUse:
    """What the CPU tier holds in its budgeted memory."""

    memory: str  # "plain" or "pinned"
    budget: int  # bytes it may hold there (0: no budget, plain memory)
    held_bytes: int  # bytes held there now
    held_adapters: int  # adapters held there now
    overflow_adapters: int  # adapters kept in plain memory since the budget was full


class HostTier:
    """Places the CPU tier's adapters in `memory` while `budget` bytes last.

    `budget` None: no limit (plain memory on a CPU device, nothing to bound). Called on
    the adapter store's loader thread (`place`) and under its lock (`release`); its own
    lock keeps the count right either way."""

    def __init__(self, memory: HostMemory, budget: int | None) -> None:
        self.memory = memory
        self.budget = budget
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}  # id of a placed AdapterWeights -> its bytes
        self._reserved = 0  # bytes of placements being copied right now
        self._overflow: set[int] = set()  # ids of weights left in plain memory

    def place(self, weights: AdapterWeights) -> AdapterWeights:
        """The weights as the CPU tier keeps them: in `memory` when they fit the budget
        (a copy, for pinned memory), else as they are. Pair with `release`."""
        size = weights.nbytes
        with self._lock:
            fits = self.budget is None or self._used() + size <= self.budget
            if not fits:
                self._overflow.add(id(weights))
                return weights
            self._reserved += size
        try:
            placed = _map_tensors(weights, self.memory.hold)  # outside the lock: a copy
        finally:
            with self._lock:
                self._reserved -= size
        with self._lock:
            self._held[id(placed)] = size
        return placed

    def release(self, weights: AdapterWeights) -> None:
        """The CPU tier dropped these weights: their bytes are free for the next ones."""
        with self._lock:
            self._held.pop(id(weights), None)
            self._overflow.discard(id(weights))

    def _used(self) -> int:
        return sum(self._held.values()) + self._reserved

    def use(self) -> HostTierUse:
        with self._lock:
            return HostTierUse(
                memory=self.memory.name,
                budget=self.budget or 0,
                held_bytes=sum(self._held.values()),
                held_adapters=len(self._held),
                overflow_adapters=len(self._overflow),
            )


def _map_tensors(weights: AdapterWeights, hold: _Hold) -> AdapterWeights:
    """A copy of `weights` with every tensor passed through `hold`."""

    def opt(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else hold(t)

    # (torch's pin_memory copies keep a tensor's strides, so lora_b stays column-major;
    # not checked here: the CPU build cannot pin)
    modules = {
        name: dataclasses.replace(
            w,
            lora_a=hold(w.lora_a),
            lora_b=hold(w.lora_b),
            row_scaling=opt(w.row_scaling),
            magnitude=opt(w.magnitude),
            dora_scale=opt(w.dora_scale),
        )
        for name, w in weights.modules.items()
    }
    experts = {
        name: dataclasses.replace(w, lora_a=hold(w.lora_a), lora_b=hold(w.lora_b))
        for name, w in weights.experts.items()
    }
    tokens = weights.tokens
    if tokens is not None:
        tokens = TokenRows(hold(tokens.ids), hold(tokens.rows))
    return dataclasses.replace(weights, modules=modules, experts=experts, tokens=tokens)


class _Hold(Protocol):
    def __call__(self, tensor: torch.Tensor) -> torch.Tensor: ...


def make_host_tier(
    device: torch.device, setting: int, figures: tuple[int, int] | None = None
) -> HostTier:
    """The CPU tier's placement for this device, chosen once at start: plain memory without
    a budget on the CPU; on CUDA pinned memory within `pinned_budget` (`figures`: the
    host's (available, total) bytes, read from /proc/meminfo when not given)."""
    if device.type != "cuda":
        return HostTier(PlainMemory(), None)
    available, total = figures if figures is not None else host_memory_figures()
    return HostTier(PinnedMemory(), pinned_budget(available, total, setting))
