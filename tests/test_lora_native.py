"""The native AVX-512 BF16 LoRA kernel against a plain torch float64 reference.

Random bf16 adapters of ranks 8/16/32/64 (and 4, 12, 40: padded inside their class) sit
in rank-class stacks of fused groups shaped as SmolLM2's (q/k/v: 576 -> 576/192/192,
gate/up: 576 -> 1536/1536, down: 1536 -> 576) and of odd sizes that exercise the
kernel's tails; batches mix slots, repeat them (tiles of one adapter's rows) and hold
rows with no adapter, which must get exactly zero.
"""

from __future__ import annotations

import pytest
import torch

from loramux.server.adapters import ModuleWeights
from loramux.server.lora import LoraGroup, make_context
from loramux.server.lora.backend import CpuNativeBackend, make_backend
from loramux.server.lora.backend.native import NativeKernelUnavailable, load_kernel

CPU = torch.device("cpu")
RANKS = {1: 8, 2: 16, 3: 32, 4: 64, 5: 4, 6: 12, 7: 40, 8: 16, 9: 64}  # slot -> rank

try:
    load_kernel()
    UNAVAILABLE = ""
except NativeKernelUnavailable as exc:  # pragma: no cover - CI and dev machines have it
    UNAVAILABLE = str(exc)
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=f"native kernel: {UNAVAILABLE}")


def _weights(slot: int, member: int, in_features: int, out: int) -> ModuleWeights:
    generator = torch.Generator().manual_seed(1000 * slot + member)
    rank = RANKS[slot]
    return ModuleWeights(
        lora_a=torch.randn(rank, in_features, generator=generator).bfloat16(),
        lora_b=torch.randn(out, rank, generator=generator).bfloat16(),
        scaling=1.5 / slot,
    )


def _group(in_features: int, outs: list[int]) -> LoraGroup:
    context = make_context(CPU, len(RANKS) + 1, "bf16", kernel="native")
    assert isinstance(context.backend, CpuNativeBackend)
    group = LoraGroup(in_features, outs, context, CPU)
    for slot, rank in RANKS.items():
        context.table.place(slot, rank)
        for member, out in enumerate(outs):
            if not (slot == 6 and member == 1):  # slot 6 leaves the second member alone
                group.write(member, slot, _weights(slot, member, in_features, out))
    return group


def _reference(group: LoraGroup, x: torch.Tensor, slots: list[int], member: int) -> torch.Tensor:
    """float64 (x A^T * scaling) B^T per row from the adapters' own weights, then bf16."""
    rows = []
    for row, slot in enumerate(slots):
        out = group.outs[member]
        if slot == 0 or (slot == 6 and member == 1):
            rows.append(torch.zeros(out, dtype=torch.float64))
            continue
        w = _weights(slot, member, group.in_features, out)
        delta = (x[row].double() @ w.lora_a.double().t()) * w.scaling @ w.lora_b.double().t()
        rows.append(delta)
    return torch.stack(rows)


SHAPES = {
    "qkv": (576, [576, 192, 192]),
    "gate_up": (576, [1536, 1536]),
    "down": (1536, [576]),
    "odd": (72, [40, 8, 100]),  # tails: in not a multiple of 32, outs of 16
}
BATCHES = {
    "distinct": [1, 2, 3, 4, 5, 6, 7, 8, 9],
    "mixed": [4, 0, 2, 2, 9, 1, 0, 3, 7, 2, 2, 2, 2, 2, 6, 5, 8, 4, 4],  # 6 rows of slot 2
    "one_slot": [3] * 11,
    "no_adapter": [0, 0, 0],
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_kernel_matches_the_float64_reference(shape: str, batch: str) -> None:
    in_features, outs = SHAPES[shape]
    group = _group(in_features, outs)
    slots = BATCHES[batch]
    backend = group.context.backend
    assert isinstance(backend, CpuNativeBackend)
    x = torch.randn(len(slots), in_features, generator=torch.Generator().manual_seed(3))
    x = x.bfloat16()
    route = group.context.route(slots, 1, CPU).row_route
    got = backend.native_deltas(group, x, route)
    for member in range(group.members):
        expected = _reference(group, x, slots, member)
        assert got[member].dtype == torch.bfloat16
        assert got[member].shape == (len(slots), outs[member])
        for row, slot in enumerate(slots):
            if slot == 0 or (slot == 6 and member == 1):
                assert torch.equal(got[member][row], torch.zeros_like(got[member][row]))
                continue
            want = expected[row]
            error = (got[member][row].double() - want).abs().max() / want.abs().max()
            # bf16 output rounding alone is up to 2^-9 of the largest value.
            assert error < 4e-3, (member, row, slot, float(error))


def test_prefill_tokens_route_as_their_rows() -> None:
    """Prefill: every token of a row takes its row's adapter (route repeated per token)."""
    group = _group(*SHAPES["qkv"])
    slots, tokens = [2, 0, 4, 2, 7], 6
    context = group.context
    batch = context.route(slots, tokens, CPU)
    x = torch.randn(len(slots) * tokens, 576, generator=torch.Generator().manual_seed(5))
    x = x.bfloat16()
    got = context.backend.deltas(group, x, batch)
    per_token = [s for s in slots for _ in range(tokens)]
    for member in range(group.members):
        expected = _reference(group, x, per_token, member)
        error = (got[member].double() - expected).abs().max() / expected.abs().max()
        assert error < 4e-3, (member, float(error))


def test_stacks_regrown_after_routing_are_read_from_their_new_place() -> None:
    """The kernel's cached pointers follow the stacks when a new adapter grows a class."""
    group = _group(*SHAPES["odd"])
    backend = group.context.backend
    assert isinstance(backend, CpuNativeBackend)
    x = torch.randn(2, 72, generator=torch.Generator().manual_seed(9)).bfloat16()
    before = backend.native_deltas(group, x, group.context.route([2, 8], 1, CPU).row_route)
    group.context.table.remove(9)  # one rank-64 slot freed, then a new rank-16 one at slot 9
    for member in range(group.members):
        group.write(member, 9, None)
    RANKS[9], saved = 16, RANKS[9]
    try:
        group.context.table.place(9, 16)  # class 16 grows from 2 to 4: its stacks are replaced
        for member, out in enumerate(group.outs):
            group.write(member, 9, _weights(9, member, 72, out))
        route = group.context.route([2, 8, 9], 1, CPU).row_route
        after = backend.native_deltas(group, torch.cat([x, x[:1]]), route)
        for member in range(group.members):
            assert torch.equal(after[member][:2], before[member])
            expected = _reference(group, torch.cat([x, x[:1]]), [2, 8, 9], member)[2]
            error = (after[member][2].double() - expected).abs().max() / expected.abs().max()
            assert error < 4e-3
    finally:
        RANKS[9] = saved


def test_native_is_refused_with_the_reason_where_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """int8 slots, or no compiler (and nothing loaded yet): `native` names why; `auto`
    keeps the compiled backend."""
    from loramux.server.lora.backend import native

    with pytest.raises(ValueError, match="bf16 slots"):
        make_backend(CPU, "native", "int8")
    assert make_backend(CPU, "auto", "bf16").name == "cpu_native"
    assert make_backend(CPU, "auto", "int8").name == "cpu"
    assert make_backend(CPU, "native", "bf16").name == "cpu_native"
    monkeypatch.setattr(native._LOADER, "_loaded", None)
    monkeypatch.setenv("CXX", "loramux-no-such-compiler")
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        make_backend(CPU, "native", "bf16")


def _peft_delta(
    slot: int, member: int, in_features: int, out: int, x: torch.Tensor
) -> torch.Tensor:
    """PEFT's own LoRA layer (float32 A and B, the scaling after B) on a zero base, in bf16."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    w = _weights(slot, member, in_features, out)
    rank = w.lora_a.shape[0]
    base = torch.nn.Linear(in_features, out, bias=False)
    torch.nn.init.zeros_(base.weight)
    layer = PeftLoraLinear(base, "a", LoraConfig(r=rank, lora_alpha=1), r=rank, lora_alpha=1)
    layer.lora_A["a"].weight.data = w.lora_a.float()
    layer.lora_B["a"].weight.data = w.lora_b.float()
    layer.scaling["a"] = w.scaling
    with torch.inference_mode():
        return layer(x.float()).bfloat16()  # 0 + delta: PEFT's delta, rounded as on a 4-bit base


@pytest.mark.parametrize("shape", ["qkv", "down"])
def test_prompt_chunks_are_peft_bit_for_bit_beside_decoding_rows(shape: str) -> None:
    """A mixed pass: three decoding rows, then prompt chunks of 23, 1 and 7 tokens. Each
    chunk's deltas are PEFT's exactly (its two float32 GEMMs); the decoding rows are the
    kernel's. With the kernel over the chunks too, no chunk matched PEFT bit for bit."""
    in_features, outs = SHAPES[shape]
    group = _group(in_features, outs)
    context = group.context
    chunks = [(2, 23), (7, 1), (3, 7)]  # (slot, tokens)
    slots = [4, 0, 9] + [slot for slot, count in chunks for _ in range(count)]
    prompts, first = [], 3
    for _, count in chunks:
        prompts.append((first, count))
        first += count
    x = torch.randn(len(slots), in_features, generator=torch.Generator().manual_seed(11))
    x = x.bfloat16()
    got = context.backend.deltas(group, x, context.route(slots, 1, CPU, prompts))
    decoding = context.backend.deltas(group, x[:3], context.route(slots[:3], 1, CPU))
    for member, out in enumerate(outs):
        assert torch.equal(got[member][:3], decoding[member])
        for (slot, _), (start, count) in zip(chunks, prompts, strict=True):
            expected = _peft_delta(slot, member, in_features, out, x[start : start + count])
            assert torch.equal(got[member][start : start + count], expected), (member, slot)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_deltas_are_added_into_the_outputs_as_torch_adds_them(shape: str) -> None:
    """The layers' path: the kernel adds each delta into its member's output in place.
    That must equal torch's `out.add_(delta)` in bf16 (the delta rounded to bf16, the sum
    rounded again), and leave the rows with no adapter exactly as they were; so must a
    pass with PEFT-computed prompt chunks."""
    in_features, outs = SHAPES[shape]
    group = _group(in_features, outs)
    context = group.context
    backend = context.backend
    assert isinstance(backend, CpuNativeBackend)
    slots = BATCHES["mixed"] + [2] * 5 + [0] * 2  # 19 decoding rows, one chunk, 2 rows without
    prompts = [(19, 5)]
    generator = torch.Generator().manual_seed(17)
    x = torch.randn(len(slots), in_features, generator=generator).bfloat16()
    for batch in (context.route(slots, 1, CPU), context.route(slots, 1, CPU, prompts)):
        bases = [torch.randn(len(slots), out, generator=generator).bfloat16() for out in outs]
        expected = [
            base.clone().add_(delta)
            for base, delta in zip(bases, backend.deltas(group, x, batch), strict=True)
        ]
        got = [base.clone() for base in bases]
        backend.add_deltas(group, x, batch, got)
        for member in range(group.members):
            assert torch.equal(got[member], expected[member]), (member, bool(batch.chunks))
            for row, slot in enumerate(slots):
                if slot == 0 or (slot == 6 and member == 1):
                    assert torch.equal(got[member][row], bases[member][row])


@pytest.mark.parametrize("shape", ["qkv", "gate_up", "odd"])
def test_a_row_gets_the_same_bits_alone_and_among_many_adapters(shape: str) -> None:
    """A lone row (batch 1) or a pair runs on the calling thread, a crowd of adapters a
    tile per thread of the team, and rows share tiles with their adapter's other rows: a
    row's delta must not depend on its company (the batch it decodes in)."""
    in_features, outs = SHAPES[shape]
    group = _group(in_features, outs)
    backend = group.context.backend
    assert isinstance(backend, CpuNativeBackend)
    crowd = [4, 1, 2, 3, 9, 5, 6, 7, 8, 1, 2, 3]
    x = torch.randn(len(crowd), in_features, generator=torch.Generator().manual_seed(23))
    x = x.bfloat16()
    together = backend.native_deltas(group, x, group.context.route(crowd, 1, CPU).row_route)
    for row in (0, 4):  # slots 4 and 9 (rank 64); then slot 1's two rows as one tile
        alone = backend.native_deltas(
            group, x[row : row + 1], group.context.route(crowd[row : row + 1], 1, CPU).row_route
        )
        for member in range(group.members):
            assert torch.equal(alone[member][0], together[member][row]), (row, member)
    rows = [1, 9]  # slot 1 twice: one tile of two rows
    pair = backend.native_deltas(
        group, x[rows], group.context.route([crowd[r] for r in rows], 1, CPU).row_route
    )
    for member in range(group.members):
        assert torch.equal(pair[member], together[member][rows]), member
