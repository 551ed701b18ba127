"""The Triton LoRA kernels (SGMV/BGMV shrink and expand) through Triton's interpreter.

On CPU tensors with `TRITON_INTERPRET=1` (set by `make_backend` before the kernels are
imported), against a float64 torch reference built from the adapters' own weights:
fused groups of one to three members, ranks 1 to 64 in their rank classes (padded inside
them), one and many adapters, rows with no adapter (exactly untouched), a composed slot
(a factor per rank row), int8 slots; decode rows (BGMV), padded prefill rows and ragged
passes with prompt chunks beside decoding rows (SGMV). Shapes are tiny: the interpreter
runs every program in numpy.
"""

from __future__ import annotations

import pytest
import torch

from loramux.server.adapters import ModuleWeights
from loramux.server.lora import LoraGroup, make_context
from loramux.server.lora.backend import TritonBackend

CPU = torch.device("cpu")
RANKS = {1: 8, 2: 16, 3: 1, 4: 64, 5: 12, 6: 40, 7: 16}  # slot -> rank
COMPOSED = 7  # its rank rows scale differently (a composition of two adapters)
LEAVES_SECOND = 5  # this slot leaves member 1 alone
# relative error of a bf16 result against float64: rounding to bf16 is up to 2^-9 of
# the value; the float32 sums add ~1e-6. Twice the rounding bound.
BF16_RTOL = 2**-8


def _weights(slot: int, member: int, in_features: int, out: int) -> ModuleWeights:
    generator = torch.Generator().manual_seed(1000 * slot + member)
    rank = RANKS[slot]
    row_scaling = None
    if slot == COMPOSED:
        row_scaling = torch.linspace(-0.7, 1.3, rank)
    return ModuleWeights(
        lora_a=torch.randn(rank, in_features, generator=generator).bfloat16(),
        lora_b=torch.randn(out, rank, generator=generator).bfloat16(),
        scaling=1.5 / slot,
        row_scaling=row_scaling,
    )


def _group(in_features: int, outs: list[int], slot_dtype: str = "bf16") -> LoraGroup:
    context = make_context(CPU, len(RANKS) + 1, slot_dtype, kernel="triton")
    assert isinstance(context.backend, TritonBackend)
    group = LoraGroup(in_features, outs, context, CPU)
    for slot, rank in RANKS.items():
        context.table.place(slot, rank)
        for member, out in enumerate(outs):
            if not (slot == LEAVES_SECOND and member == 1):
                group.write(member, slot, _weights(slot, member, in_features, out))
    return group


def _reference(
    group: LoraGroup, x: torch.Tensor, token_slots: list[int], member: int, int8: bool = False
) -> torch.Tensor:  # [tokens, out] float64
    """(x A^T * scaling per rank row) B^T per token in float64 from the adapters' weights
    (int8 slots: from the weights as the int8 format stores them)."""
    out = group.outs[member]
    rows = []
    for token, slot in enumerate(token_slots):
        if slot == 0 or (slot == LEAVES_SECOND and member == 1):
            rows.append(torch.zeros(out, dtype=torch.float64))
            continue
        w = _weights(slot, member, group.in_features, out)
        a, b = w.lora_a.double(), w.lora_b.double()
        if int8:
            a = _int8_roundtrip(a)
            b = _int8_roundtrip(b.t()).t()
        scale = (
            w.row_scaling.double()
            if w.row_scaling is not None
            else torch.full((a.shape[0],), w.scaling, dtype=torch.float64)
        )
        rows.append((x[token].double() @ a.t()) * scale @ b.t())
    return torch.stack(rows) if rows else torch.zeros(0, out, dtype=torch.float64)


def _int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    from loramux.server.lora import quantize_rows

    q, scale = quantize_rows(weight)
    return q.double() * scale.double()[:, None]


def _check(got: torch.Tensor, want: torch.Tensor, token_slots: list[int], member: int) -> None:
    for token, slot in enumerate(token_slots):
        if slot == 0 or (slot == LEAVES_SECOND and member == 1):
            assert torch.equal(got[token], torch.zeros_like(got[token])), (member, token)
            continue
        torch.testing.assert_close(
            got[token].double(), want[token], rtol=BF16_RTOL, atol=1e-6, msg=f"{member} {token}"
        )


SHAPES = {
    "qkv": (48, [48, 16, 16]),  # three members, in not a multiple of the K block
    "gate_up": (32, [80, 80]),  # out not a multiple of the N block
    "down": (80, [32]),  # one member
}
BATCHES = {
    "distinct": [1, 2, 3, 4, 5, 6, 7],
    "mixed": [4, 0, 2, 2, 7, 1, 0, 3, 2, 6, 5],
    "one_slot": [6] * 5,
    "no_adapter": [0, 0],
    "empty": [],
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_decode_rows_match_the_float64_reference(shape: str, batch: str) -> None:
    """BGMV: one token per row, each row its own adapter (or none)."""
    in_features, outs = SHAPES[shape]
    group = _group(in_features, outs)
    slots = BATCHES[batch]
    x = torch.randn(len(slots), in_features, generator=torch.Generator().manual_seed(3))
    x = x.bfloat16()
    route = group.context.route(slots, 1, CPU)
    got = group.context.backend.deltas(group, x, route)
    for member in range(group.members):
        assert got[member].shape == (len(slots), outs[member])
        _check(got[member], _reference(group, x, slots, member), slots, member)


@pytest.mark.parametrize("shape", ["qkv", "down"])
def test_padded_prefill_rows_are_segments(shape: str) -> None:
    """SGMV: a padded prefill's rows, each a segment of its tokens on the row's adapter;
    more tokens than one 16-token tile, so a segment spans two tiles."""
    in_features, outs = SHAPES[shape]
    group = _group(in_features, outs)
    slots, per_row = [2, 0, 4, 7, 2], 19
    x = torch.randn(len(slots) * per_row, in_features, generator=torch.Generator().manual_seed(5))
    x = x.bfloat16()
    route = group.context.route(slots, per_row, CPU)
    got = group.context.backend.deltas(group, x, route)
    token_slots = [slot for slot in slots for _ in range(per_row)]
    for member in range(group.members):
        _check(got[member], _reference(group, x, token_slots, member), token_slots, member)


def test_ragged_pass_chunks_beside_decoding_rows() -> None:
    """A mixed pass: decoding rows (BGMV) then prompt chunks (SGMV), ranks of several
    classes, a chunk of the composed slot and a chunk of no adapter."""
    group = _group(*SHAPES["qkv"])
    decode = [4, 0, 3, 7, 4]
    chunks = [(2, 17), (0, 3), (7, 5), (3, 1), (6, 2)]  # (slot, tokens)
    token_slots = list(decode)
    prompts = []
    for slot, count in chunks:
        prompts.append((len(token_slots), count))
        token_slots += [slot] * count
    x = torch.randn(len(token_slots), 48, generator=torch.Generator().manual_seed(7)).bfloat16()
    route = group.context.route(token_slots, 1, CPU, prompts)
    segments = route.segments
    assert segments[16].run_lens.tolist() == [17, 5]  # slots 2 and 7: a segment a chunk
    assert sorted(segments[8].single_tokens.tolist()) == [2, 30]  # a row, a 1-token chunk
    got = group.context.backend.deltas(group, x, route)
    for member in range(group.members):
        _check(got[member], _reference(group, x, token_slots, member), token_slots, member)


def test_int8_slots_match_their_stored_weights() -> None:
    group = _group(*SHAPES["qkv"], slot_dtype="int8")
    slots = BATCHES["mixed"]
    x = torch.randn(len(slots), 48, generator=torch.Generator().manual_seed(11)).bfloat16()
    got = group.context.backend.deltas(group, x, group.context.route(slots, 1, CPU))
    for member in range(group.members):
        _check(got[member], _reference(group, x, slots, member, int8=True), slots, member)


def test_deltas_are_added_into_the_outputs_in_place_as_torch_adds_them() -> None:
    """The base outputs take each delta rounded to bf16 first, then added (PEFT's 4-bit
    layers: `result + lora(x).to(result.dtype)`): bit for bit torch's bf16 add of the
    kernel's own deltas; rows with no adapter keep their bits."""
    group = _group(*SHAPES["qkv"])
    backend = group.context.backend
    token_slots = [4, 0, 2, 2, 2, 2, 7]
    prompts = [(2, 4)]
    x = torch.randn(len(token_slots), 48, generator=torch.Generator().manual_seed(13))
    x = x.bfloat16()
    route = group.context.route(token_slots, 1, CPU, prompts)
    deltas = backend.deltas(group, x, route)
    bases = [
        torch.randn(
            1, len(token_slots), out, generator=torch.Generator().manual_seed(17 + out)
        ).bfloat16()
        for out in group.outs
    ]
    outs = [base.clone() for base in bases]
    backend.add_deltas(group, x, route, outs)
    for out, base, delta in zip(outs, bases, deltas, strict=True):
        assert torch.equal(out, base + delta.view(base.shape))
        assert torch.equal(out[0, 1], base[0, 1])  # the base row: untouched
