"""The LoRA layers' paths on bf16 and int8 slots, against a plain float64 reference.

Adapters of ranks 4-32 sit in their own rank classes (no padding to the widest), and a
fused q/k/v-style group shares one shrink; every path must give each row its own
adapter's delta and base-only rows exactly nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramux.server.adapters import LinearShape, ModuleWeights
from loramux.server.lora import (
    LoraContext,
    LoraGroup,
    MultiLoraLinear,
    make_context,
    quantize_rows,
)
from loramux.server.lora.backend.native import cpu_supports_kernel

IN, SLOTS = 64, 9
OUTS = (48, 16, 16)  # a fused group of three projections sharing the input (q, k, v)
RANKS = {1: 8, 2: 16, 3: 4, 4: 32, 5: 8, 6: 12}  # slot -> rank (6 adapters: > 4 distinct)
CPU = torch.device("cpu")


def adapter(slot: int, member: int) -> ModuleWeights:
    generator = torch.Generator().manual_seed(100 * slot + member)
    rank, out = RANKS[slot], OUTS[member]
    return ModuleWeights(
        lora_a=(torch.randn(rank, IN, generator=generator) * 0.1).bfloat16(),
        lora_b=(torch.randn(out, rank, generator=generator) * 0.1).bfloat16(),
        scaling=2.0 / slot,
    )


def layers(slot_dtype: str, kernel: str = "eager") -> tuple[list[MultiLoraLinear], LoraContext]:
    context = make_context(CPU, SLOTS, slot_dtype, kernel=kernel)
    group = LoraGroup(IN, list(OUTS), context, CPU)
    wrapped = []
    for member, out in enumerate(OUTS):
        base = nn.Linear(IN, out, bias=False, dtype=torch.bfloat16)
        nn.init.zeros_(base.weight)  # the output is the LoRA delta alone
        wrapped.append(MultiLoraLinear(base, f"p{member}", LinearShape(IN, out), group, member))
    for slot, rank in RANKS.items():
        context.table.place(slot, rank)
        for member, layer in enumerate(wrapped):
            if not (slot == 5 and member == 1):  # slot 5 leaves the second projection alone
                layer.write_slot(slot, adapter(slot, member))
    return wrapped, context


def reference(x: torch.Tensor, slots: list[int], member: int) -> torch.Tensor:
    """float64 delta per row, from the adapters' own (unquantised) weights."""
    rows = []
    for row, slot in enumerate(slots):
        if slot == 0 or (slot == 5 and member == 1):
            rows.append(torch.zeros(x.shape[1], OUTS[member], dtype=torch.float64))
            continue
        w = adapter(slot, member)
        a, b = w.lora_a.double(), w.lora_b.double()
        rows.append((x[row].double() @ a.t() @ b.t()) * w.scaling)
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("slot_dtype", "kernel"),
    [
        ("bf16", "eager"),
        ("int8", "eager"),
        pytest.param(
            "bf16",
            "native",
            marks=pytest.mark.skipif(
                cpu_supports_kernel() is not None, reason=f"{cpu_supports_kernel()}"
            ),
        ),
    ],
)
@pytest.mark.parametrize(
    ("slots", "tokens"),
    [
        ([1, 2, 0, 3, 4, 5, 6, 2], 1),  # decode, 6 distinct adapters in 4 rank classes
        ([4, 4, 4], 1),  # decode, every row in one class: the dense path (one adapter)
        ([2, 2, 0, 5], 1),  # decode, few adapters: dense float32 GEMMs
        ([1, 2, 0, 3, 4, 5, 6, 2], 5),  # prefill, many adapters: segmented bmm per class
        ([6], 3),  # one adapter
    ],
    ids=["bgmv", "one-class", "dense", "segmented", "single"],
)
def test_each_path_matches_the_float64_reference(
    slot_dtype: str, kernel: str, slots: list[int], tokens: int
) -> None:
    """`native` is the AVX-512 kernel's backend, which takes every path itself."""
    wrapped, context = layers(slot_dtype, kernel)
    x = torch.randn(len(slots), tokens, IN, generator=torch.Generator().manual_seed(7))
    x = x.bfloat16()
    context.batch = context.route(slots, tokens, CPU)
    with torch.inference_mode():
        outputs = [layer(x).double() for layer in wrapped]  # q, k, v order: one shrink
    for member, got in enumerate(outputs):
        expected = reference(x, slots, member)
        error = float((got - expected).abs().max() / expected.abs().max())
        # bf16 output rounding alone is ~0.4%; int8 weights add about as much again.
        assert error < (0.03 if slot_dtype == "int8" else 0.01), (member, error)
        for row, slot in enumerate(slots):
            if slot == 0:  # base-only rows get exactly nothing added
                assert got[row].abs().max() == 0


@pytest.mark.parametrize("tokens", [1, 4], ids=["bgmv", "segmented"])
def test_a_released_index_reused_by_a_smaller_adapter_reads_none_of_the_old(tokens: int) -> None:
    """An eviction (`forget`) leaves the stack rows as they are; the adapter installed at
    the freed index next (rank 12 where rank 16 was, without the second projection) must
    compute its own delta alone: the install writes or zeroes every row there."""
    wrapped, context = layers("bf16")
    group = wrapped[0].group
    old = context.table.placement(2)
    group.forget(2)
    context.table.remove(2)
    new = context.table.place(7, 12)
    assert new == old  # the same rank class index, still holding slot 2's rows
    generator = torch.Generator().manual_seed(11)
    weights = {
        member: ModuleWeights(
            lora_a=(torch.randn(12, IN, generator=generator) * 0.1).bfloat16(),
            lora_b=(torch.randn(OUTS[member], 12, generator=generator) * 0.1).bfloat16(),
            scaling=0.5,
        )
        for member in (0, 2)
    }
    group.install(7, {0: weights[0], 1: None, 2: weights[2]})
    slots = [7, 1, 3, 4, 5, 6, 7]  # past the dense limit: the routed kernels read the stacks
    x = torch.randn(len(slots), tokens, IN, generator=generator).bfloat16()
    context.batch = context.route(slots, tokens, CPU)
    assert context.batch.dense is None
    with torch.inference_mode():
        outputs = [layer(x).double() for layer in wrapped]
    assert outputs[1][0].abs().max() == 0  # no second projection: nothing, not slot 2's
    for member in (0, 2):
        w = weights[member]
        expected = (x[0].double() @ w.lora_a.double().t() @ w.lora_b.double().t()) * 0.5
        error = float((outputs[member][0] - expected).abs().max() / expected.abs().max())
        assert error < 0.01, (member, error)


def test_the_bgmv_kernel_takes_every_class_without_the_dense_path() -> None:
    """6 distinct adapters is past the CPU backend's dense limit: the routed kernel runs."""
    _, context = layers("bf16")
    batch = context.route([1, 2, 3, 4, 5, 6], 1, CPU)
    assert batch.dense is None
    assert [r.width for r in batch.routes] == [8, 16, 32]  # ranks 4/8/8, 12/16, 32


def test_rank_classes_hold_only_their_width() -> None:
    """Ranks 8 and 32 are stored in stacks 8 and 32 rows wide, not both padded to 32."""
    wrapped, context = layers("bf16")
    group = wrapped[0].group
    assert sorted(group.stacks) == [8, 16, 32]
    assert group.stacks[8].a.shape[1] == 8 * len(OUTS)
    # Emptying a class gives its stacks back.
    for layer in wrapped:
        layer.write_slot(4, None)
    context.table.remove(4)
    group.fit()
    assert sorted(group.stacks) == [8, 16]


def test_int8_slots_hold_half_the_bytes_and_clear_to_zero() -> None:
    bf16, _ = layers("bf16")
    int8, context = layers("int8")
    stack = int8[0].group.stacks[16]
    assert stack.a.dtype == torch.int8 and all(bt.dtype == torch.int8 for bt in stack.bts)
    weights = [s.a.nbytes + sum(bt.nbytes for bt in s.bts) for s in int8[0].group.stacks.values()]
    bf16_weights = [
        s.a.nbytes + sum(bt.nbytes for bt in s.bts) for s in bf16[0].group.stacks.values()
    ]
    assert sum(weights) * 2 == sum(bf16_weights)
    for layer in int8:
        layer.write_slot(2, None)
    context.batch = context.route([2, 2, 1, 3, 4, 5], 1, CPU)
    with torch.inference_mode():
        out = int8[0](torch.ones(6, 1, IN, dtype=torch.bfloat16))
    assert out[0].abs().max() == 0 and out[2].abs().max() > 0


def test_quantize_rows_round_trip() -> None:
    weight = torch.randn(16, 100, dtype=torch.float32)
    weight[3] = 0.0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    restored = q.float() * scale[:, None]
    assert torch.all((restored - weight).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.all(restored[3] == 0)
