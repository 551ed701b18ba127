"""LoRA on fused MoE experts (issue 23): the checks at upload and the per-row arithmetic.

The end-to-end comparison with PEFT on NF4 MoE bases, in a mixed batch, is the support
matrix (tests/test_model_families.py, the expert adapters column). Here: adapter files as
PEFT's `ParamWrapper` saves them (A [E * r, in], B [out, r * E], the last targeted
parameter of a module outermost), hostile variants refused naming the tensor, and
`MultiLoraExperts` against the experts module's own forward with PEFT's merged weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from loramux.core.errors import FailedPrecondition, InvalidArgument, LoramuxError
from loramux.server.adapters import (
    WEIGHTS_FILE,
    ExpertShape,
    LinearShape,
    inspect_adapter,
)
from loramux.server.device_memory import adapter_slot_bytes

E, H, INTER, RANK = 4, 16, 8, 2
EXPERTS = "model.layers.0.mlp.experts"
PREFIX = "base_model.model."
# Qwen3-MoE's layout: gate_up_proj [E, 2I, H] (in H, out 2I), down_proj [E, H, I]
BASE_EXPERTS = {
    f"{EXPERTS}.gate_up_proj": ExpertShape(E, H, 2 * INTER),
    f"{EXPERTS}.down_proj": ExpertShape(E, INTER, H),
}
BASE_LINEARS = {"model.layers.0.self_attn.q_proj": LinearShape(H, H)}
KEYS = {  # where PEFT saves each parameter's pair: the last one declared is outermost
    "down_proj": f"{PREFIX}{EXPERTS}",
    "gate_up_proj": f"{PREFIX}{EXPERTS}.base_layer",
}


def _tensors(seed: int = 0, rank: int = RANK) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for param, key in KEYS.items():
        shape = BASE_EXPERTS[f"{EXPERTS}.{param}"]
        out[f"{key}.lora_A.weight"] = torch.randn(E * rank, shape.in_features, generator=g)
        out[f"{key}.lora_B.weight"] = torch.randn(shape.out_features, rank * E, generator=g)
    return out


def _write(folder: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 4,
        "target_modules": [],
        "target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    return folder


def _inspect(folder: Path, max_rank: int = 16) -> Any:
    return inspect_adapter(folder, BASE_LINEARS, max_rank, base_experts=BASE_EXPERTS)


def test_expert_adapter_is_read_per_expert_as_peft_splits_it(tmp_path: Path) -> None:
    tensors = _tensors()
    weights = _inspect(_write(tmp_path / "a", tensors))
    assert weights.spec.target_parameters == ("down_proj", "gate_up_proj")
    assert weights.spec.rank == RANK and weights.spec.modules == 2
    for param, key in KEYS.items():
        got = weights.experts[f"{EXPERTS}.{param}"]
        shape = BASE_EXPERTS[f"{EXPERTS}.{param}"]
        assert got.lora_a.shape == (E, RANK, shape.in_features)
        assert got.lora_b.shape == (E, shape.out_features, RANK)
        assert got.scaling == 4 / RANK
        # PEFT's ParamWrapper.get_delta_weight for an [E, out, in] parameter
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        want = torch.einsum("ore,eri->eoi", b.reshape(-1, RANK, E), a.reshape(E, RANK, -1))
        have = got.lora_b.float() @ got.lora_a.float()
        torch.testing.assert_close(have, want, rtol=0.02, atol=0.05)
    expert_bytes = sum(w.nbytes for w in weights.experts.values())
    assert expert_bytes > 0 and weights.nbytes == expert_bytes  # counted in the CPU tier


def test_slot_bytes_count_expert_lora() -> None:
    linear = adapter_slot_bytes(BASE_LINEARS.values(), 8, 3, 2)
    both = adapter_slot_bytes(BASE_LINEARS.values(), 8, 3, 2, experts=BASE_EXPERTS.values())
    per_slot = sum(E * 8 * (s.in_features + s.out_features) * 2 + 4 for s in BASE_EXPERTS.values())
    assert both - linear == 3 * per_slot


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[f"{KEYS['down_proj']}.lora_B.weight"][0, 0] = math.nan


def _swap(t: dict[str, torch.Tensor]) -> None:  # pairs saved at the wrong nesting depth
    a, b = f"{KEYS['down_proj']}.lora_A.weight", f"{KEYS['gate_up_proj']}.lora_A.weight"
    t[a], t[b] = t[b], t[a]


@pytest.mark.parametrize(
    ("change", "config", "error", "field", "names"),
    [
        (_nan, {}, InvalidArgument, WEIGHTS_FILE, "experts.lora_B.weight holds NaN"),
        (
            lambda t: t.update({k: v[:-1] for k, v in t.items() if "base_layer.lora_A" in k}),
            {},
            InvalidArgument,
            WEIGHTS_FILE,
            "base_layer.lora_A.weight",
        ),
        (_swap, {}, FailedPrecondition, WEIGHTS_FILE, "experts.lora_A.weight: the adapter maps"),
        (
            lambda t: t.pop(f"{KEYS['gate_up_proj']}.lora_B.weight"),
            {},
            InvalidArgument,
            WEIGHTS_FILE,
            "gate_up_proj (target_parameters) is missing",
        ),
        (None, {"r": 3}, InvalidArgument, "r", "experts.lora_A.weight: adapter_config.json says"),
        (None, {"target_parameters": ["q_proj.weight"]}, InvalidArgument, "target_parameters",
         "q_proj.weight names no fused MoE expert"),
        (None, {"target_parameters": "experts.down_proj"}, InvalidArgument, "target_parameters",
         "list"),
        (None, {"use_dora": True}, InvalidArgument, "target_parameters", "DoRA"),
        (None, {"rank_pattern": {"q_proj": 4}}, InvalidArgument, "rank_pattern",
         "target_parameters"),
        (
            lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if "lora_B" in k}),
            {},
            InvalidArgument,
            WEIGHTS_FILE,
            "not a float",
        ),
    ],
)  # fmt: skip
def test_hostile_expert_adapter_is_refused_naming_the_tensor(
    tmp_path: Path,
    change: Any,
    config: dict[str, Any],
    error: type[LoramuxError],
    field: str,
    names: str,
) -> None:
    tensors = _tensors()
    if change is not None:
        change(tensors)
    with pytest.raises(error) as refused:
        _inspect(_write(tmp_path / "a", tensors, **config))
    assert refused.value.field == field, refused.value
    assert names in str(refused.value)


def test_expert_rank_over_the_server_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as refused:
        _inspect(_write(tmp_path / "a", _tensors()), max_rank=1)
    assert refused.value.field == "r"


def test_expert_count_that_does_not_divide_is_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    key = f"{KEYS['down_proj']}"
    tensors[f"{key}.lora_A.weight"] = torch.randn(E * RANK + 1, INTER)
    tensors[f"{key}.lora_B.weight"] = torch.randn(H, E * RANK + 1)
    with pytest.raises(FailedPrecondition) as refused:
        _inspect(_write(tmp_path / "a", tensors))
    assert f"{key}.lora_A.weight" in str(refused.value) and "4 experts" in str(refused.value)


# ---- MultiLoraExperts against the module's own forward with PEFT's merged weights -----


def _experts_module(kind: str) -> Any:
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        config: Any = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E)
        module: Any = Qwen3MoeExperts(config)
    else:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        config = GptOssConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)
        module = GptOssExperts(config)
    config._experts_implementation = "eager"
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    return module.to(torch.bfloat16)


def _merged(module: Any, weights: dict[str, Any]) -> Any:
    """PEFT's forward with one adapter: every targeted parameter W_e + s B_e A_e, in bf16."""
    import copy

    merged = copy.deepcopy(module)
    with torch.no_grad():
        for param, w in weights.items():
            delta = w.scaling * (w.lora_b.float() @ w.lora_a.float())  # [E, out, in]
            if module.is_transposed:
                delta = delta.transpose(1, 2)
            getattr(merged, param).add_(delta.to(torch.bfloat16))
    return merged


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_each_row_gets_its_own_expert_deltas_on_the_experts_it_was_routed_to(kind: str) -> None:
    from loramux.server.adapters import ExpertWeights
    from loramux.server.lora.experts import MultiLoraExperts, base_expert_shapes

    module = _experts_module(kind)
    holder = torch.nn.Module()
    holder.experts = module
    shapes = base_expert_shapes(holder)
    assert list(shapes) == ["experts.gate_up_proj", "experts.down_proj"]
    g = torch.Generator().manual_seed(1)
    adapters = []
    for rank in (2, 4):  # two ranks: the stacks widen for the second
        adapters.append(
            {
                name.split(".")[-1]: ExpertWeights(
                    lora_a=(torch.randn(E, rank, s.in_features, generator=g) * 0.3).bfloat16(),
                    lora_b=(torch.randn(E, s.out_features, rank, generator=g) * 0.3).bfloat16(),
                    scaling=2.0,
                )
                for name, s in shapes.items()
            }
        )
    context: Any = SimpleNamespace(batch=None, table=SimpleNamespace(num_slots=4))
    layer = MultiLoraExperts(module, "experts", context, torch.device("cpu"))
    layer.install(1, adapters[0])
    layer.install(2, adapters[1])
    # memory: every slot of the stacks at the widest rank (4), bf16 A and B^T, float32 scale
    per_slot = sum(E * 4 * (s.in_features + s.out_features) * 2 + 4 for s in shapes.values())
    assert layer.slot_nbytes == per_slot and layer.nbytes == 4 * per_slot
    tokens = 9
    hidden = torch.randn(tokens, H, generator=g).bfloat16()
    index = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1).bfloat16()
    row_slots = (0, 1, 2) * 3
    context.batch = SimpleNamespace(
        slots_in_batch=frozenset({1, 2}),
        slot_per_token=torch.tensor(row_slots),
    )
    with torch.inference_mode():
        served = layer(hidden, index, weights)
        for slot, reference in ((0, module), (1, _merged(module, adapters[0]))):
            rows = [i for i, s in enumerate(row_slots) if s == slot]
            own = reference(hidden[rows], index[rows], weights[rows])
            torch.testing.assert_close(served[rows], own, rtol=0.03, atol=0.03)
        rows = [i for i, s in enumerate(row_slots) if s == 2]
        own = _merged(module, adapters[1])(hidden[rows], index[rows], weights[rows])
        torch.testing.assert_close(served[rows], own, rtol=0.03, atol=0.03)
        # the deltas are seen: an adapter row differs from the base module's output
        assert not torch.allclose(served[1:2], module(hidden[1:2], index[1:2], weights[1:2]))
    layer.forget(1)
    layer.forget(2)
    assert not layer.occupied and layer.nbytes == 0  # the stacks' memory is given back


def test_expert_adapters_are_not_composed(tmp_path: Path) -> None:
    """Composition concatenates linear LoRA along the rank; expert LoRA it would drop."""
    from loramux.server.composition import compose

    weights = _inspect(_write(tmp_path / "a", _tensors()))
    with pytest.raises(InvalidArgument) as refused:
        compose([(weights, 0.5), (weights, 0.5)])
    assert refused.value.field == "adapters" and "target_parameters" in str(refused.value)
