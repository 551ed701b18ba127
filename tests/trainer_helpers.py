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
