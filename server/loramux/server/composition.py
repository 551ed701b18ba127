"""Per-request adapter weights and composition: several adapters as one.

A request may name adapters with weights instead of one adapter. One entry with a weight
is a per-request strength (weight 0 is the base model); several are their weighted sum.
The engine serves a composition as a slot of its own holding the parts' matrices
concatenated along the rank, each rank row scaled by its part's `weight * scaling`:

    delta = sum_i w_i * s_i * B_i A_i x = [B_1 ... B_n] diag(w_i s_i) [A_1; ...; A_n] x

which is PEFT's `add_weighted_adapter(..., combination_type="cat")`, computed as PEFT does
in float32 on the parts' own (unrounded) weights: the factor stays in the row scale and
never rounds the bf16 matrices. The composed slot joins any mixed batch like an adapter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from loramux.core.errors import InvalidArgument
from loramux.server.adapters import AdapterSpec, AdapterWeights, ModuleWeights

COMPOSITE_PREFIX = "composed/"
# PEFT's add_weighted_adapter has no DoRA form ("cat" concatenates A and B; a DoRA layer's
# magnitude and norm have no such sum), so what a weighted DoRA adapter means is not
# defined by PEFT: refused rather than guessed.
EXPERTS_NOT_COMPOSED = (
    "adapters with LoRA on MoE experts (target_parameters) cannot be composed yet; "
    "request each on its own"
)
DORA_NOT_COMPOSED = (
    "a DoRA adapter (use_dora) cannot be weighted or composed: PEFT defines no weighted or "
    "combined DoRA adapter (add_weighted_adapter has no DoRA form); use it alone at weight 1"
)

# PEFT's add_weighted_adapter refuses adapters with trainable tokens (it combines LoRA
# layers only); a weighted sum of replaced embedding rows is not defined either.
TOKENS_NOT_COMPOSED = (
    "an adapter with trainable tokens (trainable_token_indices) cannot be weighted or "
    "composed: PEFT defines no weighted sum of replaced embedding rows; use it alone at weight 1"
)


def not_composable(config: dict[str, Any]) -> str | None:
    """Why an adapter with this adapter_config.json cannot be weighted or composed, if so."""
    if config.get("use_dora") is True:
        return DORA_NOT_COMPOSED
    if config.get("trainable_token_indices") not in (None, [], {}):
        return TOKENS_NOT_COMPOSED
    return None


@dataclass(frozen=True)
class WeightedAdapter:
    adapter_id: str  # engine id of a registered adapter
    weight: float


def check_weights(
    entries: Sequence[tuple[str, float]], max_entries: int, max_weight: float, field: str
) -> None:
    """Bound what a request may ask: entries, finite weights in range, no repeats."""
    if not entries:
        raise InvalidArgument(field, "at least one adapter is required")
    if len(entries) > max_entries:
        raise InvalidArgument(field, f"at most {max_entries} adapters, got {len(entries)}")
    seen: set[str] = set()
    for i, (name, weight) in enumerate(entries):
        if not name:
            raise InvalidArgument(f"{field}[{i}].name", "must not be empty")
        if name in seen:
            raise InvalidArgument(f"{field}[{i}].name", f"{name!r} is listed twice")
        seen.add(name)
        if not math.isfinite(weight) or abs(weight) > max_weight:
            raise InvalidArgument(
                f"{field}[{i}].weight",
                f"must be finite and in [-{max_weight}, {max_weight}], got {weight}",
            )


def composite_id(parts: Sequence[WeightedAdapter]) -> str:
    """A stable engine id for this composition (the same parts and weights: the same slot)."""
    text = "\n".join(f"{p.adapter_id}\t{p.weight!r}" for p in parts)
    return COMPOSITE_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:24]


def composite_spec(specs: Sequence[AdapterSpec]) -> AdapterSpec:
    """What the composition is: its rank is the sum of the parts' (largest) ranks."""
    targets = sorted({t for spec in specs for t in spec.target_modules})
    return AdapterSpec(
        rank=sum(spec.rank for spec in specs),
        alpha=float(sum(spec.rank for spec in specs)),  # as PEFT's "cat": scaling 1
        use_rslora=False,
        target_modules=tuple(targets),
        size_bytes=sum(spec.size_bytes for spec in specs),
        base_model_name_or_path=specs[0].base_model_name_or_path if specs else None,
        scaling=1.0,
        modules=max((spec.modules for spec in specs), default=0),  # at least; exact once loaded
    )


def compose(parts: Sequence[tuple[AdapterWeights, float]]) -> AdapterWeights:
    """The parts' matrices concatenated along the rank, a scale per rank row (see above)."""
    if any(weights.uses_dora for weights, _ in parts):
        raise InvalidArgument("adapters", DORA_NOT_COMPOSED)
    if any(weights.experts for weights, _ in parts):
        raise InvalidArgument("adapters", EXPERTS_NOT_COMPOSED)
    if any(weights.tokens is not None for weights, _ in parts):
        raise InvalidArgument("adapters", TOKENS_NOT_COMPOSED)
    names = sorted({name for weights, _ in parts for name in weights.modules})
    modules: dict[str, ModuleWeights] = {}
    for name in names:
        a_rows, bt_rows, scales = [], [], []
        for weights, weight in parts:
            module = weights.modules.get(name)
            if module is None:
                continue
            rank = module.lora_a.shape[0]
            a_rows.append(module.lora_a)
            bt_rows.append(module.lora_b.t())
            part_scale = (
                module.row_scaling.float()
                if module.row_scaling is not None
                else torch.full((rank,), module.scaling, dtype=torch.float32)
            )
            scales.append(part_scale * weight)
        modules[name] = ModuleWeights(
            lora_a=torch.cat(a_rows),
            lora_b=torch.cat(bt_rows).t(),  # column-major, as the loader keeps B
            scaling=1.0,
            row_scaling=torch.cat(scales),
        )
    spec = replace(composite_spec([weights.spec for weights, _ in parts]), modules=len(modules))
    return AdapterWeights(spec=spec, modules=modules)
