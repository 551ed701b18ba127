"""Multi-LoRA serving: stacked adapter slots per layer, routed per batch row.

One noun per module: `slots` (slot formats and the rank-class placement table),
`metadata` (per-pass routing), `layer` (the wrapped linear layers and their groups),
`backend` (the arithmetic, per platform), `compose` (weighted and composed adapters).
"""

from __future__ import annotations

import torch

from loramux.server.lora.backend import LoraBackend, make_backend
from loramux.server.lora.layer import (
    LoraGroup,
    MultiLoraLinear,
    base_linear_shapes,
    iter_lora_layers,
    lora_groups,
    wrap_linear_layers,
)
from loramux.server.lora.metadata import LoraBatchMetadata, LoraContext
from loramux.server.lora.slots import (
    RANK_ALIGN,
    SlotTable,
    align_rank,
    quantize_rows,
    slot_format,
)


def make_context(
    device: torch.device, num_slots: int, slot_dtype: str = "bf16", kernel: str = "auto"
) -> LoraContext:
    """Backend, slot format and an empty slot table for `num_slots` slots (0 = no adapter)."""
    return LoraContext(
        backend=make_backend(device, kernel, slot_dtype),
        slot_format=slot_format(slot_dtype),
        table=SlotTable(num_slots),
    )


__all__ = [
    "RANK_ALIGN",
    "LoraBackend",
    "LoraBatchMetadata",
    "LoraContext",
    "LoraGroup",
    "MultiLoraLinear",
    "SlotTable",
    "align_rank",
    "base_linear_shapes",
    "iter_lora_layers",
    "lora_groups",
    "make_backend",
    "make_context",
    "quantize_rows",
    "slot_format",
    "wrap_linear_layers",
]
