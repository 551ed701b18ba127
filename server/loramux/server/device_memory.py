"""How much accelerator memory the KV pool gets: arithmetic on given figures, no device.

On CUDA the pool is sized once at start, after the base model is loaded, from what
`torch.cuda.mem_get_info` reports (free, total): this process may hold
`--gpu-memory-fraction` of the device (vLLM's `gpu_memory_utilization`); what is already
in use (the weights, the CUDA context, other processes: total - free) and what will be
allocated later (the adapter slot stacks, which grow with the adapters loaded, up to
--max-loaded-adapters at --max-rank on every adaptable layer; a pass's activations) are
taken off, and the rest is the KV pool. Written as pure functions of those figures so
that the arithmetic is tested without a GPU (tests/test_device_memory.py); none of it has
run on one yet, and the activation figure is an estimate, not a measurement.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loramux.server.adapters import LinearShape

if TYPE_CHECKING:
    from loramux.server.adapters import ExpertShape


@dataclass(frozen=True)
class KvBudget:
    """The KV pool's bytes and what was taken off the allowed share to get them."""

    allowed: int  # total x fraction
    in_use: int  # total - free when sized (weights, CUDA context, other processes)
    adapter_slots: int  # the slot stacks at their largest
    activations: int  # one pass's activations and logits (estimate)
    kv: int  # what is left for the KV pool


def adapter_slot_bytes(
    shapes: Iterable[LinearShape],
    max_rank: int,
    slots: int,
    element_size: int,
    experts: Iterable[ExpertShape] = (),
) -> int:
    """Device bytes of `slots` adapters of rank `max_rank` on every adaptable layer: per
    layer A [rank, in] and B^T [rank, out] in the slot dtype, and a float32 row scale per
    rank row (`layer.ClassStack`; a fused group stacks its members' rows, the same sum);
    per fused MoE experts parameter, every expert's A and B^T in bf16 and a float32 scale
    (`experts.ExpertStack`): on a MoE base the experts' LoRA can outweigh all the rest."""
    per_adapter = sum(
        max_rank * ((shape.in_features + shape.out_features) * element_size + 4) for shape in shapes
    )
    per_adapter += sum(
        e.num_experts * max_rank * (e.in_features + e.out_features) * 2 + 4 for e in experts
    )
    return slots * per_adapter


def token_rows_bytes(hidden: int, max_rows: int, slots: int) -> int:
    """Device bytes of `slots` adapters' trainable tokens at the --max-trainable-tokens cap:
    per row an int64 id and a bf16 row of the embedding's width (`lora/tokens.py`)."""
    return slots * max_rows * (8 + 2 * hidden)


def activation_bytes(
    max_batch_tokens: int, max_batch_size: int, hidden: int, intermediate: int, vocab: int
) -> int:
    """A pass's largest live tensors, estimated: per token a few hidden-sized and the MLP's
    intermediate-sized bf16 tensors (4 x hidden + 3 x intermediate, 2 bytes each), and
    float32 logits for each row's last token (twice: logits and their softmax)."""
    per_token = (4 * hidden + 3 * intermediate) * 2
    return max_batch_tokens * per_token + 2 * max_batch_size * vocab * 4


def cuda_kv_budget(
    free: int, total: int, fraction: float, adapter_slots: int, activations: int
) -> KvBudget:
    """The KV pool's bytes from `mem_get_info`'s (free, total) once the weights are loaded;
    raises ValueError naming --gpu-memory-fraction when nothing is left."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--gpu-memory-fraction must be in (0, 1], got {fraction}")
    if not 0 <= free <= total:
        raise ValueError(f"free device memory {free} outside [0, total {total}]")
    allowed = int(total * fraction)
    in_use = total - free
    kv = allowed - in_use - adapter_slots - activations
    if kv <= 0:
        raise ValueError(
            f"--gpu-memory-fraction {fraction} allows {allowed} bytes of {total}, but {in_use} "
            f"are in use (weights, CUDA context, other processes), the adapter slots take up "
            f"to {adapter_slots} and a pass's activations ~{activations}: nothing is left for "
            "the KV cache (raise the fraction, or lower --max-loaded-adapters, --max-rank or "
            "--max-batch-tokens)"
        )
    return KvBudget(allowed, in_use, adapter_slots, activations, kv)
