"""Shared fixtures: the real default model, a tiny random Llama, a private data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton's kernels (--lora-kernel triton, --attention-kernel triton) run
# through its interpreter, which must be on before triton's first import (triton_runtime).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loramux.core.config import DEFAULT_BASE_MODEL, Settings
from loramux.core.models import ResolvedModel, resolve_base_model

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def default_models_dir() -> Path:
    """Where `loramux models prepare` put the built-in model (the user's data dir)."""
    return Settings().models_dir


@pytest.fixture(scope="session")
def smollm2(default_models_dir: Path) -> ResolvedModel:
    """The real SmolLM2-135M-Instruct, prepared once from its wheel (a no-op when ready)."""
    return resolve_base_model(DEFAULT_BASE_MODEL, default_models_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel) -> ResolvedModel:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer: fast engine tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.path))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ResolvedModel(name=str(folder), path=folder, hub_id=None)


@pytest.fixture
def home(tmp_path: Path, default_models_dir: Path) -> Path:
    """A private LORAMUX_HOME that still sees the prepared built-in models."""
    data = tmp_path / "home"
    data.mkdir()
    (data / "models").symlink_to(default_models_dir, target_is_directory=True)
    return data
