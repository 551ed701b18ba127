"""Issue 27: `loramux train --dora` makes a PEFT DoRA adapter that the server accepts."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from loramux.core.models import ResolvedModel
from loramux.server.adapters import inspect_adapter
from loramux.server.lora import base_linear_shapes
from loramux.trainer import cli
from loramux.trainer.train import build_peft_model, save_adapter


def test_dora_flag_makes_an_adapter_with_magnitudes_the_server_loads(
    tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["train", "data.jsonl", "-o", str(tmp_path / "out"), "--dora"])
    options = cli._options(args)  # the flag -> option mapping itself
    assert options.use_dora
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama.path), dtype=torch.bfloat16)
    linears = base_linear_shapes(base)
    model = build_peft_model(base, tiny_llama, options, quantized=False)
    assert model.peft_config["default"].use_dora
    save_adapter(model, tmp_path / "adapter", tiny_llama)
    loaded = inspect_adapter(tmp_path / "adapter", linears, max_rank=64)
    assert loaded.spec.use_dora and loaded.uses_dora
    assert set(loaded.modules) == set(linears)  # all-linear: a magnitude for every module
    for name, module in loaded.modules.items():
        assert module.magnitude is not None
        assert module.magnitude.shape == (linears[name].out_features,)
