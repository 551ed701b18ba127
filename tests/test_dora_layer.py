"""Issue 27: the DoRA arithmetic of one fused group against PEFT's own DoRA layer.

PEFT's `lora.Linear(use_dora=True)` on the same bf16 nn.Linear layers (with a bias, which
SmolLM2 lacks: PEFT's `base_result - bias`), rows of a DoRA adapter, a plain adapter, a
DoRA adapter on one member only and the base in one batch, decode and prefill. Fast: no
model.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

from loramux.server.adapters import AdapterSpec, AdapterWeights, LinearShape, ModuleWeights
from loramux.server.lora import LoraGroup, MultiLoraLinear, make_context
from loramux.server.lora.dora import dora_scales

IN, OUTS = 64, (48, 32)  # a fused group of two projections (gate/up)
CPU = torch.device("cpu")
# slot -> (rank, alpha, DoRA, members it adapts)
ADAPTERS = {1: (8, 16.0, True, (0, 1)), 2: (4, 8.0, False, (0, 1)), 3: (16, 8.0, True, (0,))}


def _bases() -> list[nn.Linear]:
    torch.manual_seed(0)
    return [
        nn.Linear(IN, out, bias=True, dtype=torch.bfloat16).requires_grad_(False) for out in OUTS
    ]


def _module(slot: int, member: int, base: nn.Linear) -> ModuleWeights:
    rank, alpha, dora, _ = ADAPTERS[slot]
    generator = torch.Generator().manual_seed(10 * slot + member)
    a = (torch.randn(rank, IN, generator=generator) * 0.2).bfloat16()
    b = (torch.randn(OUTS[member], rank, generator=generator) * 0.2).bfloat16()
    magnitude = None
    if dora:
        norm = torch.linalg.norm(base.weight.float(), dim=1)
        magnitude = norm * (0.8 + 0.4 * torch.rand(OUTS[member], generator=generator))
    return ModuleWeights(lora_a=a, lora_b=b, scaling=alpha / rank, magnitude=magnitude)


def _peft(base: nn.Linear, module: ModuleWeights) -> PeftLinear:
    rank = module.lora_a.shape[0]
    config = LoraConfig(
        r=rank,
        lora_alpha=round(module.scaling * rank),
        use_dora=module.magnitude is not None,
        init_lora_weights=False,
    )
    layer = PeftLinear(base, "x", config, r=rank, lora_alpha=round(module.scaling * rank))
    with torch.no_grad():
        layer.lora_A["x"].weight.copy_(module.lora_a.float())
        layer.lora_B["x"].weight.copy_(module.lora_b.float())
        if module.magnitude is not None:
            layer.lora_magnitude_vector["x"].weight.copy_(module.magnitude)
    return layer.eval()


@pytest.mark.parametrize("tokens", [1, 3], ids=["decode", "prefill"])
def test_dora_rows_are_peft_and_other_rows_are_untouched(tokens: int) -> None:
    bases = _bases()
    context = make_context(CPU, 4, "bf16", kernel="eager")
    group = LoraGroup(IN, list(OUTS), context, CPU)
    layers = [
        MultiLoraLinear(base, f"mlp.p{m}", LinearShape(IN, OUTS[m]), group, m)
        for m, base in enumerate(bases)
    ]
    modules = {
        slot: {m: _module(slot, m, bases[m]) for m in members}
        for slot, (_, _, _, members) in ADAPTERS.items()
    }
    for slot, members in modules.items():
        rank, alpha, dora, _ = ADAPTERS[slot]
        spec = AdapterSpec(rank, alpha, False, ("p",), 0, None, alpha / rank, 2, use_dora=dora)
        named = {f"mlp.p{m}": w for m, w in members.items()}
        loaded = dora_scales(
            AdapterWeights(spec, named), {f"mlp.p{m}": b for m, b in enumerate(bases)}
        )
        context.table.place(slot, rank, dora=dora)
        group.install(slot, {m: loaded.modules.get(f"mlp.p{m}") for m in range(len(OUTS))})

    slots = [1, 2, 0, 3, 1, 2]
    x = torch.randn(len(slots), tokens, IN, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.inference_mode():
        context.batch = context.route(slots, tokens, CPU)
        got = [layer(x) for layer in layers]
        plain_rows = [i for i, s in enumerate(slots) if s != 1 and s != 3]
        context.batch = context.route([slots[i] for i in plain_rows], tokens, CPU)
        without_dora = [layer(x[plain_rows]) for layer in layers]
    for m, base in enumerate(bases):
        for row, slot in enumerate(slots):
            module = modules.get(slot, {}).get(m)
            with torch.inference_mode():
                expected = base(x[row]) if module is None else _peft(base, module)(x[row])
            if module is None:  # base rows, and slot 3 on the member it leaves alone
                assert torch.equal(got[m][row], expected), (m, row)
            elif module.magnitude is not None:  # DoRA: PEFT's maths, bf16 apart
                # Two bf16 ulps of the largest output: the delta is rounded to bf16 before
                # the DoRA term (PEFT keeps it float32), and the base layer's bf16 GEMM on
                # the whole batch rounds its last bit unlike PEFT's on one row. A lost or
                # wrong g moves outputs by 10-20% (g is within [0.8, 1.2] here).
                error = float((got[m][row].float() - expected.float()).abs().max())
                assert error <= 2**-6 * float(expected.float().abs().max()), (m, row, error)
            else:  # plain rows: what a batch without DoRA gives, bit for bit
                assert torch.equal(got[m][row], without_dora[m][plain_rows.index(row)]), (m, row)
    # The DoRA rows moved from plain LoRA's output: g is applied, not dropped.
    with torch.inference_mode():
        lora_only = _peft(bases[0], ModuleWeights(**{**modules[1][0].__dict__, "magnitude": None}))
        assert not torch.allclose(lora_only(x[0]).float(), got[0][0].float(), rtol=0.02)
