"""The CPU backend with the hand-written AVX-512 BF16 kernel (`native.py`) for mixed batches."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loramux.server.lora.backend.cpu import CpuBackend
from loramux.server.lora.backend.native import MAX_MEMBERS, NativeKernel
from loramux.server.lora.metadata import LoraBatchMetadata

if TYPE_CHECKING:
    from loramux.server.lora.layer import LoraGroup


@dataclass(frozen=True)
class KernelPlan:
    """A group's class stacks as the kernel reads them, valid while the stacks are."""

    version: int  # the group's fitted SlotTable version (its stacks change only with it)
    plan: torch.Tensor  # [K, 4 + M] int64: width, capacity, A, row_scale, Bt_0..Bt_{M-1}
    outs: torch.Tensor  # [M] int64: out_features per member
    # The kernel's fixed arguments, as ints: ~1 us each to ask torch for on every call
    plan_ptr: int
    outs_ptr: int
    classes: int


class CpuNativeBackend(CpuBackend):
    """Every batch with adapters, decode and prefill, in one native call per group.

    One call covers every rank class and every member of a fused group, reading each
    adapter's rows once however many rows (or prefill tokens) of the batch use it. The
    compiled kernel took one call per rank class plus the gathers and scatters around it
    and ~20 us of torch.compile's per-call overhead; the dense float32 GEMMs ~6 small ops.
    Measured per call on SmolLM2's q/k/v group, batch 32, rank 16 (p10 of 300 calls, 2
    threads): 32 adapters 31 us (compiled 64 us), ranks 8-64 56 us (compiled 273 us), one
    adapter 23 us (dense GEMMs 76 us); batch 1 8 us (dense 14 us). So no dense path here.
    """

    name = "cpu_native"
    dense_max_adapters = 0
    # Up to this many prompt chunks in a pass are computed as PEFT does (`prompt_chunk`):
    # ~9-15 ms per 28-token chunk of a rank-16 all-linear adapter on SmolLM2 (13 chunks
    # +113 ms, 16 beside 16 decoding rows +245 ms over the kernel; load ~4), not for a
    # bigger burst of prompts (32 prompts of 32 tokens: prefill 714 -> 947 ms, compiled
    # 714, base 477; load ~5), which the kernel takes whole. 16, not 4, since short
    # prompts arriving while rows decode join one pass together (Engine._prefill_chunks)
    # instead of one or two a step: tests/test_composition.py's 14 requests then share a
    # pass, and with 4 their prompts left PEFT's numbers (111 tokens compared, 112 asked).
    peft_chunks_max = 16

    def __init__(self, kernel: NativeKernel) -> None:
        super().__init__("eager")  # the compiled fallback is never needed: bf16 slots only
        self.kernel_mode = "native"
        self.native = kernel

    def deltas(
        self, group: LoraGroup, x: torch.Tensor, batch: LoraBatchMetadata
    ) -> list[torch.Tensor]:
        outs = _zeros(group, x)
        self.add_deltas(group, x, batch, outs)  # 0 + bf16(delta) is bf16(delta) exactly
        return outs

    def add_deltas(
        self,
        group: LoraGroup,
        x: torch.Tensor,
        batch: LoraBatchMetadata,
        outs: Sequence[torch.Tensor],
    ) -> None:
        """The kernel adds each member's delta into its output rows in place (outputs in
        bf16, contiguous, as the 4-bit base layers give them; else the generic path).

        Measured per SmolLM2 q/k/v group, one rank-16 adapter, batch 1 (p50 of 3,000
        calls): a delta tensor per member, its split and three adds took 25.5 us around a
        2.4 us kernel call; see docs/performance.md for the step.
        """
        for out in outs:
            if out.dtype != torch.bfloat16 or not out.is_contiguous():
                super().add_deltas(group, x, batch, outs)
                return
        if 0 < len(batch.chunks) <= self.peft_chunks_max:  # those as PEFT, the rest here
            if batch.token_route is not None:
                self._native(group, x, batch.token_route, outs)
            rows = [out.view(-1, out.shape[-1]) for out in outs]
            for chunk in batch.chunks:
                self.prompt_chunk(group, x, chunk, rows)
            return
        self._native(group, x, batch.route_per_token, outs)

    def native_deltas(
        self,
        group: LoraGroup,
        x: torch.Tensor,  # [n, in] bf16
        route: torch.Tensor,  # [n, 2] int64: (rank class width or 0, index in its stack)
    ) -> list[torch.Tensor]:  # M x [n, out_m] bf16
        """Every member's delta alone, added to zeros (rows with no adapter stay zero)."""
        outs = _zeros(group, x)
        self._native(group, x, route, outs)
        return outs

    def _native(
        self,
        group: LoraGroup,
        x: torch.Tensor,  # [n, in]
        route: torch.Tensor,  # [n, 2] int64
        outs: Sequence[torch.Tensor],  # M x [n, out_m] bf16, contiguous: deltas added
    ) -> None:
        plan = self._plan(group)
        if x.dtype != torch.bfloat16 or not x.is_contiguous():
            x = x.to(torch.bfloat16).contiguous()
        self.native.bgmv(
            x.shape[0],
            group.in_features,
            group.members,
            plan.outs_ptr,
            x.data_ptr(),
            plan.classes,
            plan.plan_ptr,
            route.data_ptr(),
            (ctypes.c_int64 * group.members)(*[out.data_ptr() for out in outs]),
        )

    def _plan(self, group: LoraGroup) -> KernelPlan:
        cached = group.kernel_plan
        if isinstance(cached, KernelPlan) and cached.version == group.version:
            return cached
        if group.members > MAX_MEMBERS:
            raise ValueError(f"a fused group of {group.members} projections (most {MAX_MEMBERS})")
        rows = []
        for width, stack in sorted(group.stacks.items()):
            tensors = (stack.a, *stack.bts)
            if any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in tensors):
                raise ValueError("the native LoRA kernel reads contiguous bf16 slot stacks")
            rows.append(
                [width, stack.a.shape[0], stack.a.data_ptr(), stack.row_scale.data_ptr()]
                + [bt.data_ptr() for bt in stack.bts]
            )
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4 + group.members)
        outs = torch.tensor(group.outs, dtype=torch.int64)
        plan = KernelPlan(
            version=group.version,
            plan=table,
            outs=outs,
            plan_ptr=table.data_ptr(),
            outs_ptr=outs.data_ptr(),
            classes=table.shape[0],
        )
        group.kernel_plan = plan
        return plan

    def warm(self, group: LoraGroup) -> None:
        """Nothing to compile: the library was built (or found in its cache) at start."""


def _zeros(group: LoraGroup, x: torch.Tensor) -> list[torch.Tensor]:
    """Each member's [tokens, out_m] bf16 zeros, for deltas on their own."""
    return [x.new_zeros(x.shape[0], out, dtype=torch.bfloat16) for out in group.outs]
