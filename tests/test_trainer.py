"""Issue 5: the QLoRA trainer on a tiny random Llama (fast): output format, logs, Ctrl-C, resume.

The tiny model cannot learn anything meaningful; `test_trainer_learns.py` shows learning on
the real SmolLM2. Here the point is the machinery around the Trainer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hub_server import HubServer
from trainer_helpers import tiny_settings, write_task

from loramux.core.errors import FailedPrecondition, InvalidArgument, NotFound
from loramux.core.models import ResolvedModel, load_base_model
from loramux.trainer.callbacks import read_metrics
from loramux.trainer.options import TrainOptions
from loramux.trainer.train import TrainResult, build_peft_model, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return dict(yaml.safe_load(card.split("\n---\n", 1)[0][4:]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama: ResolvedModel) -> TrainResult:
    root = tmp_path_factory.mktemp("trained")
    options = TrainOptions(
        train_file=write_task(root / "train.jsonl", 24),
        eval_file=write_task(root / "eval.jsonl", 8, start=100),
        output_dir=root / "adapter",
        max_steps=6,
        batch_size=4,
        grad_accum=2,
        learning_rate=5e-3,
        logging_steps=2,
        eval_steps=3,
        save_steps=3,
        rank=4,
        progress_bar=False,
    )
    return train(options, tiny_settings(tiny_llama), echo=None)


def test_output_is_a_standard_peft_folder(trained: TrainResult, tiny_llama: ResolvedModel) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    out = trained.output_dir
    assert not trained.interrupted and trained.steps == 6
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["base_model_name_or_path"] == str(tiny_llama.path)  # no Hub id: the folder
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B was trained
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    # Loads with plain PEFT on top of the base model and changes its output.
    base = load_base_model(tiny_llama, "nf4", "cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(out))
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_counts_logs_curve_and_card(trained: TrainResult) -> None:
    out = trained.output_dir
    assert 0 < trained.trainable_params < trained.total_params
    assert 0.1 < trained.trainable_percent < 5
    assert trained.optimizer == "adamw_torch"  # the CPU default
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
    assert trained.initial_eval_loss == records[0]["eval_loss"]
    assert trained.eval_loss == [r for r in records if "eval_loss" in r][-1]["eval_loss"]
    assert trained.train_loss == [r for r in records if "loss" in r][-1]["loss"]
    curve = (out / "loss_curve.png").read_bytes()
    assert curve.startswith(PNG_MAGIC) and len(curve) > 5000
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft"
    assert {"lora", "qlora", "loramux"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder has no Hub id
    assert f"| final eval loss | {trained.eval_loss:.4f} |" in card
    assert f"| final train loss | {trained.train_loss:.4f} |" in card
    assert "| examples used | 24 | 8 |" in card
    assert "![loss curve](loss_curve.png)" in card
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 6 and summary["options"]["rank"] == 4
    assert summary["train_data"]["examples"] == 24
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-3",
        "checkpoint-6",
    ]


def test_evaluation_leaves_gradients_intact(tiny_llama: ResolvedModel) -> None:
    """Regression: an eval pass must not repack 4-bit weights into a layout without backward."""
    base = load_base_model(tiny_llama, "nf4", "cpu")
    options = TrainOptions(train_file=Path("-"), output_dir=Path("-"), lora_dropout=0.0)
    model = build_peft_model(base, tiny_llama, options, quantized=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def lora_grads() -> list[torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n]

    with torch.no_grad():  # make B non-zero so that grads reach A
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what the Trainer's evaluation does
    after = lora_grads()
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        assert not getattr(state, "packing_format_for_cpu", False)


def test_output_dir_holding_a_run_needs_resume_or_overwrite(
    trained: TrainResult, tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    options = TrainOptions(
        train_file=write_task(tmp_path / "t.jsonl", 4), output_dir=trained.output_dir, max_steps=1
    )
    with pytest.raises(FailedPrecondition, match="--resume to continue it or --overwrite"):
        train(options, tiny_settings(tiny_llama), echo=None)
    fresh = TrainOptions(
        train_file=tmp_path / "t.jsonl", output_dir=tmp_path / "none", max_steps=1, resume=True
    )
    with pytest.raises(NotFound, match="no checkpoint to resume"):
        train(fresh, tiny_settings(tiny_llama), echo=None)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"lr_scheduler": "sawtooth"}, "lr_scheduler"),
        ({"warmup": 2.5}, "warmup"),
        ({"max_seq_len": 4}, "max_seq_len"),
        ({"eval_split": 0.1, "eval_file": Path("x")}, "eval_split"),
        ({"compute_dtype": "float16"}, "compute_dtype"),
    ],
)
def test_bad_options_name_the_option(change: dict[str, Any], field: str) -> None:
    options = TrainOptions(train_file=Path("t"), output_dir=Path("o"), **change)
    with pytest.raises(InvalidArgument) as caught:
        options.validate()
    assert caught.value.field == field


def test_unknown_target_modules_are_refused(tiny_llama: ResolvedModel, tmp_path: Path) -> None:
    options = TrainOptions(
        train_file=write_task(tmp_path / "t.jsonl", 4),
        output_dir=tmp_path / "o",
        target_modules=["no_such_proj"],
        max_steps=1,
    )
    with pytest.raises(InvalidArgument) as caught:
        train(options, tiny_settings(tiny_llama), echo=None)
    assert caught.value.field == "target_modules"


def _cli(tmp: Path, tiny: ResolvedModel, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "loramux.cli",
        "train",
        str(tmp / "train.jsonl"),
        "-o",
        str(tmp / "run"),
        "--base-model",
        str(tiny.path),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--logging-steps",
        "1",
        "--save-steps",
        "1000",
        "--no-progress",
        "--log-level",
        "WARNING",
        *extra,
    ]


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(
    tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    write_task(tmp_path / "train.jsonl", 64)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        _cli(tmp_path, tiny_llama, "--max-steps", "100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # wait until training has logged its second step
        seen.append(line)
        if "'loss'" in line and len([s for s in seen if "'loss'" in s]) >= 2:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    output = "".join(seen) + out
    assert proc.returncode == 130, output + err
    assert "interrupted at step" in output and "--resume" in output
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1, output
    checkpoint = checkpoints[0]
    step = int(checkpoint.name.split("-")[1])
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step >= 2
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()  # not finished

    publish = ("--push-to-hub", "alice/resumed", "--branch", "exp")
    with HubServer() as hub:  # and publish when done, as `--push-to-hub` promises
        resumed = subprocess.run(
            _cli(tmp_path, tiny_llama, "--max-steps", str(step + 3), "--resume", *publish),
            capture_output=True,
            text=True,
            env=hub.env(env),
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"commit {hub.head('alice/resumed', 'exp')}" in resumed.stdout
        published = hub.files("alice/resumed", "exp")
        assert (
            published["adapter_model.safetensors"]
            == (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
        )
    assert f"resuming from {checkpoint} (step {step})" in resumed.stdout
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["steps"] == step + 3
    logged = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert logged == list(range(1, step + 4))  # no step lost, none logged twice
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
def test_cuda_uses_paged_8bit_adamw_and_bf16(tiny_llama: ResolvedModel, tmp_path: Path) -> None:
    """The CUDA path: the QLoRA paper's paged 8-bit AdamW and bf16 mixed precision."""
    options = TrainOptions(
        train_file=write_task(tmp_path / "t.jsonl", 16),
        eval_split=0.25,
        output_dir=tmp_path / "cuda",
        max_steps=3,
        batch_size=4,
        grad_accum=1,
        progress_bar=False,
    )
    result = train(options, tiny_settings(tiny_llama, device="cuda"), echo=None)
    assert result.optimizer == "paged_adamw_8bit"
    assert result.steps == 3 and result.eval_loss is not None
    assert torch.isfinite(torch.tensor(result.eval_loss))
    summary = json.loads((result.output_dir / "training.json").read_text())
    assert summary["device"].startswith("cuda")
