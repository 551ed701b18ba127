"""The engine end to end with both Triton kernels (`--lora-kernel triton --attention-kernel
triton`) through Triton's interpreter on CPU tensors, against PEFT.

The tiny random 2-layer Llama (conftest, its decisive variant) in NF4, as the other
engine tests load it; one mixed batch of the base model, three adapters of different
ranks and targets, and a composition of two of them, all submitted together: their
prompts prefill in one pass (SGMV over padded rows) and they decode together (BGMV, the
Triton paged attention for every decoding row). Each request's greedy tokens must be
PEFT's on its own copy of the same NF4 base (PEFT's `add_weighted_adapter(..., "cat")`
for the composition), up to a parting where PEFT's own best logits were nearly tied (the
rule of the other PEFT tests).

Gemma 2 (windows, soft-capping) through the Triton kernel: tests/test_gemma2_kernels.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_helpers import (
    engine_with_adapters,
    linear_shapes,
    peft_generate,
    peft_request_adapter,
    peft_with_adapters,
    tokens_before_parting,
    write_adapter_plan,
)

from loramux.core.models import ResolvedModel
from loramux.server.composition import WeightedAdapter
from loramux.server.engine import Engine
from loramux.server.lora.backend import TritonBackend
from loramux.server.requests import GenerationRequest, SamplingParams

NEW_TOKENS = 8
# (name, rank, alpha, rsLoRA, targets): large enough deltas to move this tiny model
ADAPTERS = [
    ("all8", 8, 16.0, False, None),
    ("qv16", 16, 32.0, False, ("q_proj", "v_proj")),
    ("mlp4", 4, 8.0, False, ("gate_proj", "up_proj", "down_proj")),
]
REQUESTS: list[list[tuple[str, float]]] = [
    [],  # the base model
    [("all8", 1.0)],
    [("qv16", 1.0)],
    [("mlp4", 1.0)],
    [("all8", 0.7), ("mlp4", -0.5)],  # a composition: its own slot, a factor per rank row
]
PROMPT = "Name three colours."


@pytest.fixture(scope="module")
def adapter_dirs(
    tmp_path_factory: pytest.TempPathFactory, decisive_tiny_llama: ResolvedModel
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton-adapters")
    plan = write_adapter_plan(
        root, linear_shapes(decisive_tiny_llama.path), ADAPTERS, seed_offset=40
    )
    for folder in plan.values():  # this tiny model needs larger deltas than 0.06 x randn
        _scale_adapter(folder, 8.0)
    return plan


def _scale_adapter(folder: Path, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = {name: (t.float() * factor).to(t.dtype) for name, t in load_file(path).items()}
    save_file(tensors, path)


@pytest.fixture(scope="module")
def engine(decisive_tiny_llama: ResolvedModel, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    engine = engine_with_adapters(
        decisive_tiny_llama,
        adapter_dirs,
        lora_kernel="triton",
        attention_kernel="triton",
        max_loaded_adapters=6,
        max_batch_size=8,
    )
    yield engine
    engine.shutdown()


def _peft_outputs(
    decisive_tiny_llama: ResolvedModel, dirs: dict[str, Path], prompt: list[int]
) -> list[tuple[list[int], list[tuple[int, ...] | None]]]:
    """Per request: PEFT's greedy tokens and its nearly tied top tokens per position."""
    model = peft_with_adapters(decisive_tiny_llama, dirs)
    return [
        peft_generate(model, prompt, peft_request_adapter(model, parts, f"req{r}"), NEW_TOKENS)
        for r, parts in enumerate(REQUESTS)
    ]


def test_mixed_batch_with_both_triton_kernels_gives_pefts_tokens(
    engine: Engine, decisive_tiny_llama: ResolvedModel, adapter_dirs: dict[str, Path]
) -> None:
    assert engine._lora is not None and isinstance(engine._lora.backend, TritonBackend)
    assert engine.runner.kernel is not None and engine.runner.kernel.name == "triton"
    prompt = engine.render_chat([("user", PROMPT)])
    ids = [
        engine.adapters.weighted([WeightedAdapter(n, w) for n, w in parts]) if parts else None
        for parts in REQUESTS
    ]
    streams = [
        engine.submit(
            GenerationRequest(
                f"r{r}",
                prompt,
                SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                adapter_id,
            )
        )
        for r, adapter_id in enumerate(ids)
    ]
    got = [[t for event in stream for t in event.token_ids] for stream in streams]
    expected = _peft_outputs(decisive_tiny_llama, adapter_dirs, prompt)
    compared = 0
    for r, (tokens, (reference, ties)) in enumerate(zip(got, expected, strict=True)):
        compared += tokens_before_parting(tokens, reference, ties, REQUESTS[r])
    # The adapters change what the model says (else this compares the base five times).
    assert len({tuple(reference) for reference, _ in expected}) == len(REQUESTS)
    # Nearly all of it was compared (a near-tie cuts a sequence short now and then).
    assert compared >= 0.8 * len(REQUESTS) * NEW_TOKENS, compared
