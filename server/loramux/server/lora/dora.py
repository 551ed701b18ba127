"""DoRA on the shared 4-bit base: PEFT's weight-decomposed LoRA as a scale per channel.

PEFT's DoRA layer (`DoraLinearLayer.forward`, PEFT 0.22) adds to the base layer's output

    (g - 1) * (W x) + g * scaling * B A x,    g = magnitude / ||W + scaling * B A||

with W the dequantised base weight [out, in] and the norm taken per output channel (a
row of W). At inference g is a constant vector once W and the adapter are known, so it
is computed here once per adapter module when the adapter is loaded (`dora_scales`, on
the loader thread), and a DoRA slot holds g beside its A and B (`layer.LoraGroup`): the
served output is `base + bf16((g - 1) * (base - bias) + g * delta)` for the rows of that
slot, and exactly `base + delta` for every other row (g = 1 there).

g is computed as PEFT computes it on each forward: W dequantised by bitsandbytes'
`dequantize_4bit` (PEFT's `dequantize_module_weight`) and cast to float32 (the dtype
PEFT's float32 LoRA weights cast the input to), `B @ A` in float32, `torch.linalg.norm`
over each row of `W + scaling * B A`, then `magnitude / norm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from loramux.core.errors import FailedPrecondition

if TYPE_CHECKING:
    from torch import nn

    from loramux.server.adapters import AdapterWeights, ModuleWeights


def dequantized_weight(base: nn.Module) -> torch.Tensor:  # [out, in] float32
    """The base layer's weight as PEFT's DoRA reads it: a bitsandbytes 4-bit weight
    dequantised (`dequantize_4bit`, double-quantised absmax included), else as it is."""
    weight: Any = base.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes as bnb

        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights in place for its AVX512-BF16 CPU kernel on
            # the first forward pass; `dequantize_4bit` does not read that layout (PEFT's
            # DoRA reads it as if it did), and its absmax was rounded to bf16 on the way.
            raise FailedPrecondition(
                "use_dora",
                "the 4-bit base's weights are in bitsandbytes' packed CPU layout, from which "
                "the dequantised weight DoRA is defined on cannot be read back exactly; DoRA "
                "adapters are not served on this machine",
            )
        dequantized: torch.Tensor = bnb.functional.dequantize_4bit(weight.data, state)
        return dequantized.float()
    return torch.as_tensor(weight).detach().float()


def dora_scale(weight: torch.Tensor, module: ModuleWeights) -> torch.Tensor:  # [out] float32
    """g = magnitude / ||W + scaling * B A|| per output channel, in float32 as PEFT."""
    assert module.magnitude is not None
    lora_weight = module.lora_b.float() @ module.lora_a.float()  # [out, in]
    norm = torch.linalg.norm(weight + module.scaling * lora_weight, dim=1)
    return (module.magnitude / norm).contiguous()


def dora_scales(weights: AdapterWeights, bases: Mapping[str, nn.Module]) -> AdapterWeights:
    """`weights` with g computed for every module that has a magnitude.

    A g that is not finite (a zero row of `W + scaling * B A`) would make PEFT's output
    NaN or infinite: refused, naming the module.
    """
    if not weights.uses_dora:
        return weights
    modules: dict[str, ModuleWeights] = {}
    with torch.no_grad():
        for name, module in weights.modules.items():
            if module.magnitude is None:
                modules[name] = module
                continue
            scale = dora_scale(dequantized_weight(bases[name]), module)
            low, high = (float(v) for v in torch.aminmax(scale))
            if not (math.isfinite(low) and math.isfinite(high)):
                raise FailedPrecondition(
                    "use_dora",
                    f"{name}: magnitude / ||W + scaling B A|| is not finite (a zero row of the "
                    "adapted weight); PEFT's output would be NaN or infinite",
                )
            modules[name] = replace(module, dora_scale=scale)
    return replace(weights, modules=modules)
