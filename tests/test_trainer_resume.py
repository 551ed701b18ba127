"""Issue 15 (5, 6): an interrupted and resumed run ends where an uninterrupted one does;
--report-to tensorboard and wandb (offline) log the run. Tiny random Llama, a few steps."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import tiny_settings, write_task
from transformers import TrainerCallback

from loramux.core.models import ResolvedModel
from loramux.trainer.options import TrainOptions
from loramux.trainer.train import train

STEPS = 6


class SignalAtStep(TrainerCallback):  # type: ignore[misc]
    """Sends this process a real SIGINT (what Ctrl-C does) at the end of one step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _options(root: Path, output: str, **extra: Any) -> TrainOptions:
    values: dict[str, Any] = {
        "train_file": write_task(root / "train.jsonl", 12),
        "output_dir": root / output,
        "max_steps": STEPS,  # 3 steps an epoch: the interrupted epoch is resumed mid-way
        "batch_size": 2,
        "grad_accum": 2,
        "learning_rate": 5e-3,
        "lora_dropout": 0.1,  # dropout draws random numbers: the RNG state must resume too
        "rank": 4,
        "logging_steps": 1,
        "save_steps": 100,
        "progress_bar": False,
        "eval_before_training": False,
        **extra,
    }
    return TrainOptions(**values)


def test_interrupted_and_resumed_equals_uninterrupted(
    tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    settings = tiny_settings(tiny_llama)
    whole = train(_options(tmp_path, "whole"), settings, echo=None)
    assert whole.steps == STEPS

    first = train(_options(tmp_path, "split"), settings, echo=None, callbacks=[SignalAtStep(2)])
    assert first.interrupted and 2 <= first.steps < STEPS
    assert not (tmp_path / "split" / "adapter_model.safetensors").exists()
    resumed = train(_options(tmp_path, "split", resume=True), settings, echo=None)
    assert not resumed.interrupted and resumed.steps == STEPS

    expected = load_file(str(whole.output_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed.output_dir / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    moved = 0.0
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-6, msg=key)
        if "lora_B" in key:
            moved = max(moved, float(tensor.abs().max()))
    assert moved > 1e-3  # the adapter did train (B starts at zero)
    assert resumed.train_loss == pytest.approx(whole.train_loss, rel=1e-5)


def test_report_to_tensorboard_and_wandb_offline(
    tiny_llama: ResolvedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    options = _options(
        tmp_path,
        "reported",
        max_steps=2,
        eval_file=write_task(tmp_path / "eval.jsonl", 4, start=50),
        eval_before_training=True,
        report_to=["tensorboard", "wandb"],
    )
    result = train(options, tiny_settings(tiny_llama), echo=None)
    out = result.output_dir

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags
    losses = [e.value for e in events.Scalars("eval/loss")]
    assert losses[0] == pytest.approx(result.initial_eval_loss, rel=1e-5)

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb"))  # the offline log `wandb sync` uploads
    assert "WANDB_DIR" not in os.environ  # set for the run only

    card = (out / "README.md").read_text()
    assert f"| eval loss before training | {result.initial_eval_loss:.4f} |" in card
    assert f"| final eval loss | {result.eval_loss:.4f} |" in card
