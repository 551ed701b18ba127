"""Random LoRA adapters in PEFT's file format, for tests, benchmarks and smoke checks.

Written directly (adapter_config.json + adapter_model.safetensors) rather than through
PEFT, so that making a hundred adapters takes a second, not a model load each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.server.adapter_targets import match_modules
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
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dora_weights: Mapping[str, torch.Tensor] | None = None,
    dora_spread: float = 0.1,
    trainable_tokens: tuple[Sequence[int], torch.Tensor] | None = None,
    embedding_name: str = "model.embed_tokens",
) -> Path:
    """Write an adapter with random A and B on `targets` (short names; None = all linear).

    `rank_pattern`/`alpha_pattern`: PEFT's per-module ranks and alphas (matched as PEFT
    matches them). `dora_weights`: the base's dequantised weights [out, in] by module name,
    to make a DoRA adapter: each magnitude is the norm of its row of `W + scaling * B A`
    (the g of PEFT's DoRA would be 1) times a random factor in [1 - spread, 1 + spread].
    `trainable_tokens`: (token ids, their rows [n, hidden]) saved as PEFT saves
    trainable_token_indices on the input embedding `embedding_name`.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = {
        name: shape
        for name, shape in base_linears.items()
        if targets is None or name.rsplit(".", 1)[-1] in targets
    }
    ranks, alphas = _patterns(list(chosen), rank, alpha, rank_pattern, alpha_pattern)
    tensors = {}
    for name, shape in chosen.items():
        r = ranks[name]
        a = (torch.randn(r, shape.in_features, generator=generator) * scale).to(dtype)
        b = (torch.randn(shape.out_features, r, generator=generator) * scale).to(dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        if dora_weights is not None:
            scaling = alphas[name] / (math.sqrt(r) if use_rslora else r)
            norm = torch.linalg.norm(dora_weights[name] + scaling * (b.float() @ a.float()), dim=1)
            jitter = 1 + dora_spread * (2 * torch.rand(norm.shape, generator=generator) - 1)
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = (norm * jitter).contiguous()
    if trainable_tokens is not None:
        key = f"{PEFT_PREFIX}{embedding_name}.token_adapter.trainable_tokens_delta"
        tensors[key] = trainable_tokens[1].contiguous()
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
        "use_dora": dora_weights is not None,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in chosen}),
        "modules_to_save": None,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "inference_mode": True,
    }
    if trainable_tokens is not None:
        config["trainable_token_indices"] = [int(i) for i in trainable_tokens[0]]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


def _patterns(
    names: list[str],
    rank: int,
    alpha: float,
    rank_pattern: Mapping[str, int] | None,
    alpha_pattern: Mapping[str, float] | None,
) -> tuple[dict[str, int], dict[str, float]]:
    """Each module's rank and alpha under PEFT's rank_pattern/alpha_pattern rules."""
    rank_keys, alpha_keys = list(rank_pattern or {}), list(alpha_pattern or {})
    targeting = {
        "target_modules": names,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
    }
    keys = match_modules(targeting, names, names)["wrapped"]
    ranks, alphas = {}, {}
    for name in names:
        rank_key, alpha_key = keys[name]
        ranks[name] = rank if rank_key is None else (rank_pattern or {})[rank_keys[rank_key]]
        alphas[name] = (
            alpha if alpha_key is None else float((alpha_pattern or {})[alpha_keys[alpha_key]])
        )
    return ranks, alphas
