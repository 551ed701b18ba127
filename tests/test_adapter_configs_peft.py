"""Issue 11.1: config fields the server applies are applied as PEFT applies them.

Each adapter's served greedy output on the real NF4 SmolLM2 against PEFT's PeftModel on a
separately loaded copy of the same base. The adapters are written with the config fields
under test (missing lora_alpha, rank/alpha patterns, exclude_modules, layers_to_transform,
a regex target_modules), and carry exactly the weights PEFT would wrap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import (
    engine_with_adapters,
    linear_shapes,
    peft_generate,
    peft_with_adapters,
    tokens_before_parting,
)
from safetensors.torch import save_file

from loramux.core.models import ResolvedModel
from loramux.server.adapters import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, LinearShape
from loramux.server.engine import Engine
from loramux.server.requests import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.peft_reference]

NEW_TOKENS = 10
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _layer(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.<i>.…


# name -> (config fields, rank of each module that gets weights; None = no weights)
def _plans(linears: dict[str, LinearShape]) -> dict[str, tuple[dict[str, Any], dict[str, int]]]:
    names = list(linears)
    no_alpha = ({"r": 4, "target_modules": ALL}, dict.fromkeys(names, 4))
    patterns = (
        {
            "r": 4,
            "lora_alpha": 4,
            "target_modules": ALL,
            "rank_pattern": {"model.layers.3.mlp.down_proj": 2, "q_proj": 8},
            "alpha_pattern": {"v_proj": 8, "layers.1.mlp.up_proj": 1},
        },
        {
            n: 2 if n == "model.layers.3.mlp.down_proj" else 8 if _short(n) == "q_proj" else 4
            for n in names
        },
    )
    excluded = {"model.layers.0.self_attn.q_proj", "model.layers.5.self_attn.k_proj"}
    exclude = (
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "exclude_modules": ["layers.0.self_attn.q_proj", "model.layers.5.self_attn.k_proj"],
        },
        {n: 8 for n in names if _short(n) in ALL[:4] and n not in excluded},
    )
    layers = (
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ALL,
            "layers_to_transform": list(range(0, 30, 2)),
            "layers_pattern": "layers",
        },
        {n: 8 for n in names if _layer(n) % 2 == 0},
    )
    regex = (
        {"r": 8, "lora_alpha": 16, "target_modules": r".*\.(q_proj|v_proj|down_proj)"},
        {n: 8 for n in names if _short(n) in ("q_proj", "v_proj", "down_proj")},
    )
    return {
        "no-alpha": no_alpha,
        "patterns": patterns,
        "exclude": exclude,
        "layers": layers,
        "regex": regex,
    }


def _write(
    folder: Path,
    linears: dict[str, LinearShape],
    config: dict[str, Any],
    ranks: dict[str, int],
    seed: int,
) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, rank in ranks.items():
        shape = linears[name]
        a = torch.randn(rank, shape.in_features, generator=generator) * 0.06
        b = torch.randn(shape.out_features, rank, generator=generator) * 0.06
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.bfloat16()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.bfloat16()
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    full = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **config}
    (folder / CONFIG_FILE).write_text(json.dumps(full))
    return folder


@pytest.fixture(scope="module")
def adapter_dirs(
    tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel
) -> dict[str, Path]:
    linears = linear_shapes(smollm2.path)
    root = tmp_path_factory.mktemp("config-adapters")
    return {
        name: _write(root / name, linears, config, ranks, seed)
        for seed, (name, (config, ranks)) in enumerate(_plans(linears).items())
    }


@pytest.fixture(scope="module")
def engine(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    engine = engine_with_adapters(smollm2, adapter_dirs, max_loaded_adapters=8, max_batch_size=8)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def peft_model(smollm2: ResolvedModel, adapter_dirs: dict[str, Path]) -> Any:
    return peft_with_adapters(smollm2, adapter_dirs)


def _peft_generate(
    model: Any, ids: list[int], adapter: str | None
) -> tuple[list[int], list[tuple[int, ...] | None]]:
    return peft_generate(model, ids, adapter, NEW_TOKENS)


@pytest.mark.parametrize("name", ["no-alpha", "patterns", "exclude", "layers", "regex"])
def test_served_output_matches_peft(engine: Engine, peft_model: Any, name: str) -> None:
    """Token for token; a sequence may part from PEFT only where PEFT's own best logits
    are nearly tied, by taking one of them (docs/engine.md, Correctness): nothing after
    that is comparable."""
    differs_from_base = False
    for i, prompt in enumerate(PROMPTS):
        ids = engine.render_chat([("user", prompt)])
        stream = engine.submit(
            GenerationRequest(f"{name}-{i}", ids, SamplingParams(max_new_tokens=NEW_TOKENS), name)
        )
        tokens = [t for event in stream for t in event.token_ids]
        expected, ties = _peft_generate(peft_model, ids, name)
        tokens_before_parting(tokens, expected, ties, (name, prompt))
        differs_from_base |= expected != _peft_generate(peft_model, ids, None)[0]
    assert differs_from_base, f"{name}: too weak to tell apart from the base model"
