"""Random LoRA adapters in PEFT's file format, for tests, benchmarks and smoke checks.

Written directly (adapter_config.json + adapter_model.safetensors) rather than through
PEFT, so that making a hundred adapters takes a second, not a model load each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.server.adapters import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, LinearShape


def write_random_adapter(
    folder: Path,
    base_linears: Mapping[str, LinearShape],
    *,
    rank: int = 16,
    alpha: float = 32.0,
    targets: Sequence[str] | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    scale: float = 0.02,
    base_model_name_or_path: str = "smollm2-135m-instruct",
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write an adapter with random A and B on `targets` (short names; None = all linear)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = {
        name: shape
        for name, shape in base_linears.items()
        if targets is None or name.rsplit(".", 1)[-1] in targets
    }
    tensors = {}
    for name, shape in chosen.items():
        a = torch.randn(rank, shape.in_features, generator=generator) * scale
        b = torch.randn(shape.out_features, rank, generator=generator) * scale
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in chosen}),
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder
