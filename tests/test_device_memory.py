"""The CUDA memory arithmetic (device_memory.py) from given (free, total) figures: no GPU."""

from __future__ import annotations

import pytest

from loramux.core.config import Settings
from loramux.server.adapters import LinearShape
from loramux.server.device_memory import (
    activation_bytes,
    adapter_slot_bytes,
    cuda_kv_budget,
    token_rows_bytes,
)

GIB = 1 << 30
# One Llama-3-8B decoder layer's adaptable projections (q, k, v, o, gate, up, down).
LLAMA3_8B_LAYER = [
    LinearShape(4096, 4096),
    LinearShape(4096, 1024),
    LinearShape(4096, 1024),
    LinearShape(4096, 4096),
    LinearShape(4096, 14336),
    LinearShape(4096, 14336),
    LinearShape(14336, 4096),
]


def test_adapter_slots_count_a_b_and_a_scale_per_rank_row() -> None:
    shapes = [LinearShape(64, 64), LinearShape(64, 128)]
    # rank 16: (64 + 64) x 2 bytes + 4 and (64 + 128) x 2 + 4 per rank row, 3 slots
    assert adapter_slot_bytes(shapes, 16, 3, element_size=2) == 3 * 16 * (260 + 388)
    assert adapter_slot_bytes(shapes, 16, 3, element_size=1) == 3 * 16 * (132 + 196)


def test_token_rows_count_an_id_and_a_bf16_row_each() -> None:
    # SmolLM2 (hidden 576), 32 slots at the default cap of 64 rows: 2.4 MB
    assert token_rows_bytes(576, 64, 32) == 32 * 64 * (8 + 1152) == 2_375_680
    assert token_rows_bytes(576, 0, 32) == 0


def test_llama3_8b_slots_at_rank_64() -> None:
    """32 layers, 32 slots of rank 64 in bf16: 81,920 in + out features a layer."""
    per_layer = 64 * (81_920 * 2 + 7 * 4)
    assert adapter_slot_bytes(LLAMA3_8B_LAYER * 32, 64, 32, 2) == 32 * 32 * per_layer
    assert 32 * 32 * per_layer == 10_739_253_248  # ~10 GiB: what --max-rank 64 reserves


def test_the_pool_gets_what_the_fraction_leaves() -> None:
    # An 80 GiB card, 10 GiB in use once the weights are loaded, 0.9 allowed.
    plan = cuda_kv_budget(70 * GIB, 80 * GIB, 0.9, adapter_slots=2 * GIB, activations=GIB)
    assert plan.allowed == 72 * GIB
    assert plan.in_use == 10 * GIB
    assert plan.kv == 72 * GIB - 10 * GIB - 2 * GIB - GIB


def test_memory_used_by_another_process_is_not_taken_again() -> None:
    """Free memory is what is free now: another process's 30 GiB count as in use."""
    plan = cuda_kv_budget(40 * GIB, 80 * GIB, 0.9, adapter_slots=0, activations=0)
    assert plan.kv == 72 * GIB - 40 * GIB


def test_nothing_left_is_an_error_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"--gpu-memory-fraction 0\.5 allows"):
        cuda_kv_budget(40 * GIB, 80 * GIB, 0.5, adapter_slots=GIB, activations=GIB)
    with pytest.raises(ValueError, match="must be in"):
        cuda_kv_budget(40 * GIB, 80 * GIB, 1.5, 0, 0)
    with pytest.raises(ValueError, match="outside"):
        cuda_kv_budget(90 * GIB, 80 * GIB, 0.9, 0, 0)


def test_activations_estimate() -> None:
    # Llama-3-8B, 2,048 tokens a pass, 32 rows: (4 x 4096 + 3 x 14336) x 2 bytes a token
    # and two float32 logits rows of 128,256 per row.
    got = activation_bytes(2048, 32, 4096, 14336, 128_256)
    assert got == 2048 * (4 * 4096 + 3 * 14336) * 2 + 2 * 32 * 128_256 * 4


def test_the_setting_is_validated_when_built() -> None:
    assert Settings().gpu_memory_fraction == 0.9
    Settings(gpu_memory_fraction=1.0).validate()
    with pytest.raises(ValueError, match="--gpu-memory-fraction must be in"):
        Settings(gpu_memory_fraction=0.0).validate()
