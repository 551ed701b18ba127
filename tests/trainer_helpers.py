"""Helpers shared by the trainer tests: a small chat task, settings for the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramux.core.config import Settings
from loramux.core.models import ResolvedModel


def write_task(path: Path, count: int, start: int = 0) -> Path:
    """A small chat task in the shape users write (JSONL of messages)."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(start, start + count):
            record = {
                "messages": [
                    {"role": "user", "content": f"Code for item {i}?"},
                    {"role": "assistant", "content": f"ANSWER: {i * 7 % 13} ###"},
                ]
            }
            handle.write(json.dumps(record) + "\n")
    return path


def tiny_settings(tiny: ResolvedModel, **extra: Any) -> Settings:
    """Settings that train on the tiny Llama; the CPU unless `device` says otherwise."""
    values: dict[str, Any] = {"device": "cpu", **extra}
    return Settings(base_model=str(tiny.path), **values)


def assert_same_gradients(model: Any, reference: Any, rtol: float, atol: float) -> None:
    """Every parameter of `model` got a gradient equal to `reference`'s (same architecture)."""
    import torch

    pairs = zip(model.named_parameters(), reference.parameters(), strict=True)
    for (name, ours), theirs in pairs:
        assert ours.grad is not None, name
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=rtol, atol=atol, msg=name)
