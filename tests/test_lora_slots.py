"""MultiLoraLinear's three paths on bf16 and int8 slots, against a plain float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramux.server.adapters import LinearShape, ModuleWeights
from loramux.server.lora import (
    LoraBatchMetadata,
    LoraContext,
    MultiLoraLinear,
    make_decode_kernel,
    quantize_rows,
)

IN, OUT, SLOTS = 64, 48, 9
RANKS = {1: 8, 2: 16, 3: 4, 4: 16, 5: 8, 6: 12}  # slot -> rank (6 adapters: > 4 distinct)


def adapter(slot: int) -> ModuleWeights:
    generator = torch.Generator().manual_seed(slot)
    rank = RANKS[slot]
    return ModuleWeights(
        lora_a=(torch.randn(rank, IN, generator=generator) * 0.1).bfloat16(),
        lora_b=(torch.randn(OUT, rank, generator=generator) * 0.1).bfloat16(),
        scaling=2.0 / slot,
    )


def layer(quantized: bool) -> tuple[MultiLoraLinear, LoraContext]:
    base = nn.Linear(IN, OUT, bias=False, dtype=torch.bfloat16)
    nn.init.zeros_(base.weight)  # the output is the LoRA delta alone
    context = LoraContext(decode_kernel=make_decode_kernel("eager", quantized), quantized=quantized)
    wrapped = MultiLoraLinear(
        base, "proj", LinearShape(IN, OUT), SLOTS, context, torch.bfloat16, torch.device("cpu")
    )
    wrapped.grow_rank(16)
    for slot in RANKS:
        wrapped.write_slot(slot, adapter(slot))
    return wrapped, context


def reference(x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """float64 delta per row, from the adapters' own (unquantised) weights."""
    rows = []
    for row, slot in enumerate(slots):
        if slot == 0:
            rows.append(torch.zeros(x.shape[1], OUT, dtype=torch.float64))
            continue
        w = adapter(slot)
        a, b = w.lora_a.double(), w.lora_b.double()
        rows.append((x[row].double() @ a.t() @ b.t()) * w.scaling)
    return torch.stack(rows)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize(
    ("slots", "tokens"),
    [
        ([1, 2, 0, 3, 4, 5, 6, 2], 1),  # decode, 6 distinct adapters: the BGMV kernel
        ([2, 2, 0, 5], 1),  # decode, few adapters: dense float32 GEMMs
        ([1, 2, 0, 3, 4, 5, 6, 2], 5),  # prefill, many adapters: segmented bmm
        ([6], 3),  # one adapter
    ],
    ids=["bgmv", "dense", "segmented", "single"],
)
def test_each_path_matches_the_float64_reference(
    quantized: bool, slots: list[int], tokens: int
) -> None:
    wrapped, context = layer(quantized)
    x = torch.randn(len(slots), tokens, IN, generator=torch.Generator().manual_seed(7))
    x = x.bfloat16()
    context.batch = LoraBatchMetadata.build(slots, tokens, torch.device("cpu"))
    with torch.inference_mode():
        got = wrapped(x).double()
    expected = reference(x, slots)
    error = float((got - expected).abs().max() / expected.abs().max())
    # bf16 output rounding alone is ~0.4%; int8 weights add about as much again.
    assert error < (0.03 if quantized else 0.01), error
    for row, slot in enumerate(slots):
        if slot == 0:  # base-only rows get exactly nothing added
            assert got[row].abs().max() == 0


def test_int8_slots_hold_half_the_bytes_and_clear_to_zero() -> None:
    bf16, _ = layer(False)
    int8, context = layer(True)
    assert int8.lora_a.dtype == int8.lora_bt.dtype == torch.int8
    weight_bytes = int8.lora_a.nbytes + int8.lora_bt.nbytes
    assert weight_bytes * 2 == bf16.lora_a.nbytes + bf16.lora_bt.nbytes
    int8.write_slot(2, None)
    context.batch = LoraBatchMetadata.build([2, 2, 1, 3, 4, 5], 1, torch.device("cpu"))
    with torch.inference_mode():
        out = int8(torch.ones(6, 1, IN, dtype=torch.bfloat16))
    assert out[0].abs().max() == 0 and out[2].abs().max() > 0


def test_quantize_rows_round_trip() -> None:
    weight = torch.randn(16, 100, dtype=torch.float32)
    weight[3] = 0.0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    restored = q.float() * scale[:, None]
    assert torch.all((restored - weight).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.all(restored[3] == 0)
