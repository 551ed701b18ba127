"""`loramux train --compute-dtype`: the choice `auto` makes, and a choice reaching the layers.

The choice is a pure function of the device and the machine's facts, tested here against
the flag sets of real CPUs; one short training run on the tiny Llama shows an explicit
choice is the compute dtype of every 4-bit layer, and that it goes into the model card and
training.json. The adapter saved is fp32 (PEFT's default for LoRA matrices on a bf16 base)
whichever dtype it was trained in, as before the option existed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import tiny_settings, write_task
from transformers import TrainerCallback

from loramux.core.models import ResolvedModel
from loramux.trainer.precision import choose_compute_dtype, cpu_flags
from loramux.trainer.train import train


def _flags(text: str) -> frozenset[str]:
    return frozenset(text.split(" "))


# /proc/cpuinfo "flags" of real CPUs (abridged to what matters and a few neighbours).
ZEN3_AVX2 = _flags("fpu sse4_2 avx avx2 fma f16c bmi2 sha_ni vaes")
SKYLAKE_AVX512 = _flags("avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni")
ZEN4_BF16 = _flags("avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16")
SAPPHIRE_RAPIDS = _flags("avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
AMX_ONLY = _flags("avx2 avx512f amx_bf16 amx_tile")


@pytest.mark.parametrize(
    ("device", "flags", "cuda_bf16", "expected"),
    [
        ("cpu", ZEN3_AVX2, False, "float32"),  # this machine's kind: bf16 only emulated
        ("cpu", SKYLAKE_AVX512, False, "float32"),  # AVX-512 without its BF16 extension
        ("cpu", ZEN4_BF16, False, "bfloat16"),
        ("cpu", SAPPHIRE_RAPIDS, False, "bfloat16"),
        ("cpu", AMX_ONLY, False, "bfloat16"),
        ("cpu", frozenset(), False, "float32"),  # no /proc/cpuinfo (macOS): assume none
        ("cuda", frozenset(), True, "bfloat16"),  # Ampere and later
        ("cuda", ZEN4_BF16, False, "float32"),  # a V100: the host CPU's flags do not count
    ],
)
def test_auto_picks_bf16_only_where_it_is_native(
    device: str, flags: frozenset[str], cuda_bf16: bool, expected: str
) -> None:
    choice = choose_compute_dtype("auto", device, cpu_flags=flags, cuda_bf16=cuda_bf16)
    assert choice.dtype == expected and choice.requested == "auto"
    assert choice.reason.startswith("auto: ")
    if device == "cpu" and expected == "bfloat16":
        assert any(flag in choice.reason for flag in ("avx512_bf16", "amx_bf16")), choice.reason
    assert choice.torch_dtype == getattr(torch, expected)


@pytest.mark.parametrize("asked", ["bfloat16", "float32"])
@pytest.mark.parametrize(("device", "flags"), [("cpu", ZEN3_AVX2), ("cpu", ZEN4_BF16)])
def test_an_explicit_dtype_is_kept_whatever_the_machine(
    asked: Any, device: str, flags: frozenset[str]
) -> None:
    choice = choose_compute_dtype(asked, device, cpu_flags=flags, cuda_bf16=False)
    assert choice.dtype == asked
    assert choice.reason == f"--compute-dtype {asked} was asked for"


def test_cpu_flags_read_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre_v1\n"
    )
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd4f\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


class LayerDtypes(TrainerCallback):
    """Notes the compute dtype of every 4-bit layer of the model when training starts."""

    def __init__(self) -> None:
        self.seen: list[torch.dtype] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from bitsandbytes.nn import Linear4bit

        layers = [m for m in kwargs["model"].modules() if isinstance(m, Linear4bit)]
        self.seen += [layer.compute_dtype for layer in layers]


@pytest.mark.parametrize("asked", ["bfloat16", "float32"])
def test_the_dtype_asked_for_is_the_4bit_layers_and_the_cards(
    asked: str, tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from loramux.trainer.options import TrainOptions

    spy = LayerDtypes()
    options = TrainOptions(
        train_file=write_task(tmp_path / "t.jsonl", 4),
        output_dir=tmp_path / "out",
        max_steps=1,
        batch_size=4,
        grad_accum=1,
        rank=4,
        compute_dtype=asked,  # type: ignore[arg-type]
        progress_bar=False,
    )
    result = train(options, tiny_settings(tiny_llama), echo=None, callbacks=[spy])
    assert len(spy.seen) == 2 * 7 and set(spy.seen) == {getattr(torch, asked)}  # 2 layers x 7
    summary = json.loads((result.output_dir / "training.json").read_text())
    reason = f"--compute-dtype {asked} was asked for"
    assert summary["compute_dtype"] == {"dtype": asked, "requested": asked, "reason": reason}
    card = (result.output_dir / "README.md").read_text()
    short = {"bfloat16": "bf16", "float32": "fp32"}[asked]
    assert f"| compute dtype | {short} ({reason}) |" in card
    assert f"double quantization and {short} compute" in card
    weights = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}


def test_the_cli_flag_reaches_the_options_and_refuses_others(tmp_path: Path) -> None:
    from loramux.cli import build_parser
    from loramux.trainer.cli import _options

    parser = build_parser()
    args = parser.parse_args(["train", "t.jsonl", "-o", "out", "--compute-dtype", "bfloat16"])
    assert _options(args).compute_dtype == "bfloat16"
    assert _options(parser.parse_args(["train", "t.jsonl", "-o", "out"])).compute_dtype == "auto"
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "loramux.cli",
            "train",
            "t.jsonl",
            "-o",
            "o",
            "--compute-dtype",
            "fp16",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and "--compute-dtype: invalid choice: 'fp16'" in refused.stderr
