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

And a tiny Gemma 2 (a sliding layer and a full one, attention logit soft-capping) served
with `--attention-kernel triton`: the kernel computes its windows and caps for every
decoding row, and the greedy tokens are PEFT's by the same rule (measured: with the
window or the cap left out of the kernel, a sequence parts from PEFT where it was not tied).
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


# A tiny Gemma 2: layer 0 slides over WINDOW tokens, layer 1 attends to everything; both
# soft-cap their scores. Prompts are longer than the window, so the decoding rows (the
# Triton kernel's) see keys it must drop, and their scores reach the cap.
GEMMA_WINDOW = 8
GEMMA_SOFTCAP = 2.0
GEMMA_PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the fence",
    "Once upon a time in a small village by the sea there lived an old fisherman",
]


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel) -> ResolvedModel:
    """Weights drawn wide (std 0.2, as the decisive tiny Llama's) so greedy choices are
    clear; Gemma 2's own final logit soft-capping (30)."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-gemma2")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.path))
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=GEMMA_WINDOW,
        attn_logit_softcapping=GEMMA_SOFTCAP,
        final_logit_softcapping=30.0,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    assert config.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ResolvedModel(name=str(folder), path=folder, hub_id=None)


def test_gemma2_windows_and_soft_capping_by_the_triton_kernel_give_pefts_tokens(
    tiny_gemma2: ResolvedModel, tmp_path: Path
) -> None:
    """`--attention-kernel triton` on a Gemma 2 (refused before it computed windows and
    soft-capping): the base model and an attention adapter, two prompts, in one batch whose
    prompts are prefilled in chunks beside decoding rows; every request's greedy tokens are
    PEFT's (near-tie rule) on the same NF4 base, through transformers' own eager Gemma 2
    attention."""
    from peft import PeftModel

    from loramux.core.config import Settings
    from loramux.core.models import load_base_model, load_tokenizer
    from loramux.server.lora import base_linear_shapes
    from loramux.server.synthetic import write_random_adapter

    settings = Settings(
        attention_kernel="triton", max_batch_tokens=24, max_batch_size=8, max_loaded_adapters=2
    )
    engine = Engine(
        load_base_model(tiny_gemma2, "nf4", "cpu"),
        load_tokenizer(tiny_gemma2),
        settings,
        tiny_gemma2,
    )
    try:
        assert engine.runner.kernel is not None and engine.runner.kernel.name == "triton"
        reference = load_base_model(tiny_gemma2, "nf4", "cpu")
        adapter = write_random_adapter(
            tmp_path / "qv", base_linear_shapes(reference), rank=8, alpha=16,
            targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=5, scale=0.3,
        )  # fmt: skip
        engine.adapters.register("qv", adapter)
        model = PeftModel.from_pretrained(reference, str(adapter), "qv").eval()
        prompts = [engine.tokenize(p) for p in GEMMA_PROMPTS]
        assert all(len(ids) > GEMMA_WINDOW for ids in prompts)
        streams = {
            (name, i): engine.submit(
                GenerationRequest(
                    f"{name}-{i}", ids, SamplingParams(max_new_tokens=NEW_TOKENS), name
                )
            )
            for i, ids in enumerate(prompts)
            for name in (None, "qv")
        }
        got = {key: [t for e in stream for t in e.token_ids] for key, stream in streams.items()}
    finally:
        engine.shutdown()
    compared = 0
    outputs = set()
    for (name, i), tokens in got.items():
        expected, ties = peft_generate(model, prompts[i], name, NEW_TOKENS)
        outputs.add(tuple(expected))
        compared += tokens_before_parting(tokens, expected, ties, (name, i))
    assert len(outputs) == len(got)  # the adapter changes what the model says
    assert compared >= 0.8 * len(got) * NEW_TOKENS, compared
