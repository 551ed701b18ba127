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
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2)


@pytest.fixture(scope="session")
def decisive_tiny_llama(
    tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel
) -> ResolvedModel:
    """The tiny Llama with weights drawn 10x wider (std 0.2, not transformers' 0.02).

    At the default width its logits span ~1.3 over 49k tokens, so top tokens are within
    a bf16 rounding of each other at most steps (measured: 4 of 8 greedy steps of one
    request within 0.3% of the span) and any change of summation order, not only a
    defect, parts a sequence from PEFT's; wider weights make its greedy choices clear.
    """
    return _tiny_llama(tmp_path_factory.mktemp("decisive-tiny-llama"), smollm2, 0.2)


def _tiny_llama(folder: Path, smollm2: ResolvedModel, init_std: float = 0.02) -> ResolvedModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

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
        initializer_range=init_std,
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
