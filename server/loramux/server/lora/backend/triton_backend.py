"""The Triton backend: explicit SGMV/BGMV shrink and expand kernels (`triton_ops.py`).

The default on CUDA (`--lora-kernel auto`), and `--lora-kernel triton` on any device: on
the CPU the same kernels run through Triton's interpreter (numpy per program: correct and
slow, for the tests and `bench/gpu.sh --dry-run`, never for serving speed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from loramux.server.lora.backend.base import LoraBackend
from loramux.server.lora.metadata import LoraBatchMetadata
from loramux.server.triton_runtime import prepare

if TYPE_CHECKING:
    from loramux.server.lora.layer import LoraGroup


class TritonBackend(LoraBackend):
    """Every batch with adapters through the kernels, per rank class present: one shrink
    for all members of a fused group (q/k/v, gate/up: their A rows are stacked) and one
    expand per member, added into the base outputs in place, rounded to their dtype
    first, as the CPU's native kernel and PEFT's 4-bit layers do. Prompt chunks (and
    padded prefill rows) are segments for the SGMV kernels, decoding rows the BGMV ones.
    Composed adapters and int8 slots are slots like any other: their factors are in
    `row_scale`. No dense path: a GPU has no per-GEMM fixed cost to avoid, so nothing
    here is tuned for few adapters (not measured: no GPU has been available)."""

    name = "triton"
    dense_max_adapters = 0

    def __init__(self, device: torch.device) -> None:
        super().__init__("eager")  # nothing compiled by torch
        self.kernel_mode = "triton"
        prepare(device)
        from loramux.server.lora.backend import triton_ops

        self.ops = triton_ops

    def deltas(
        self, group: LoraGroup, x: torch.Tensor, batch: LoraBatchMetadata
    ) -> list[torch.Tensor]:
        outs = [x.new_zeros(x.shape[0], out) for out in group.outs]
        self.add_deltas(group, x, batch, outs)  # 0 + round(delta) is round(delta)
        return outs

    def add_deltas(
        self,
        group: LoraGroup,
        x: torch.Tensor,  # [tokens, in]
        batch: LoraBatchMetadata,
        outs: Sequence[torch.Tensor],  # M x [..., out_m], tokens in x's order
    ) -> None:
        segments = batch.segments
        if not segments:
            return
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows = [_rows(out) for out in outs]
        for width, seg in segments.items():
            stack = group.stacks[width]
            shrunk = x.new_empty(x.shape[0], stack.a.shape[1], dtype=torch.float32)
            for starts, lens, index, longest in (
                (seg.single_tokens, None, seg.single_index, 1),
                (seg.run_starts, seg.run_lens, seg.run_index, seg.longest),
            ):
                if starts.shape[0] == 0:
                    continue
                self.ops.shrink(x, stack.a, stack.row_scale, shrunk, starts, lens, index, longest)
                for member, (bt, out) in enumerate(zip(stack.bts, rows, strict=True)):
                    self.ops.expand(shrunk, member * width, bt, out, starts, lens, index, longest)
        for out, flat in zip(outs, rows, strict=True):
            if flat.data_ptr() != out.data_ptr():  # a copy (`_rows`): put it back
                out.copy_(flat.view(out.shape))

    def warm(self, group: LoraGroup) -> None:
        """Nothing: Triton compiles (or the interpreter reads) a kernel at its first call."""


def _rows(out: torch.Tensor) -> torch.Tensor:  # [tokens, out_m], last dim contiguous
    """`out` as token rows the kernels can add into: a view when its layout allows, else a
    contiguous copy that `add_deltas` copies back."""
    if out.is_contiguous():
        return out.view(-1, out.shape[-1])
    return out.reshape(-1, out.shape[-1]).contiguous()
